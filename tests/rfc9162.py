"""An independent Merkle tree reference and proof verifier for the tests, written from RFC 9162's text
(2.1.1 the tree hash, 2.1.3.2 verifying an inclusion proof, 2.1.4.2 verifying a consistency proof) and
C2SP signed-note: it shares no code with aitbc_coord, so a mistake there cannot cancel out here."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def hash_leaf(entry: bytes) -> bytes:
    """2.1.1: MTH({d(0)}) = HASH(0x00 || d(0))."""
    return sha256(bytes([0]) + entry)


def hash_children(left: bytes, right: bytes) -> bytes:
    """2.1.1: HASH(0x01 || MTH(D[0:k]) || MTH(D[k:n]))."""
    return sha256(bytes([1]) + left + right)


class Tree:
    """Every leaf and every complete subtree hash of a list of entries, kept level by level, so that MTH
    of any prefix is quick to compute by 2.1.1's recursion."""

    def __init__(self, entries: Sequence[bytes] = ()) -> None:
        self.levels: list[list[bytes]] = [[]]
        for entry in entries:
            self.append(entry)

    def append(self, entry: bytes) -> None:
        self.levels[0].append(hash_leaf(entry))
        level = 0
        while len(self.levels[level]) % 2 == 0:
            pair = self.levels[level][-2:]
            if len(self.levels) == level + 1:
                self.levels.append([])
            self.levels[level + 1].append(hash_children(*pair))
            level += 1

    def mth(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) by 2.1.1: split at the largest power of two smaller than the size."""
        n = end - start
        if n == 0:
            return sha256(b"")
        if n & (n - 1) == 0 and start % n == 0:  # a complete subtree, already hashed
            return self.levels[n.bit_length() - 1][start // n]
        k = 1
        while k * 2 < n:
            k *= 2
        return hash_children(self.mth(start, start + k), self.mth(start + k, end))

    def root(self, size: int) -> bytes:
        return self.mth(0, size)


def verify_inclusion(leaf_hash: bytes, leaf_index: int, tree_size: int, inclusion_path: Sequence[bytes],
                     root_hash: bytes) -> bool:
    """RFC 9162 2.1.3.2, step by step."""
    if leaf_index >= tree_size:
        return False
    fn, sn = leaf_index, tree_size - 1
    r = leaf_hash
    for p in inclusion_path:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            r = hash_children(p, r)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn //= 2
                    sn //= 2
        else:
            r = hash_children(r, p)
        fn //= 2
        sn //= 2
    return sn == 0 and r == root_hash


def verify_consistency(first: int, second: int, first_hash: bytes, second_hash: bytes,
                       consistency_path: Sequence[bytes]) -> bool:
    """RFC 9162 2.1.4.2, step by step. (For first == second, 2.1.4.1 defines the proof as empty, and the
    trees are the same when their roots are: checked before the algorithm, which starts from a non-empty
    path.)"""
    if first == second:
        return len(consistency_path) == 0 and first_hash == second_hash
    if not 0 < first < second or len(consistency_path) == 0:
        return False
    path = list(consistency_path)
    if first & (first - 1) == 0:  # first is an exact power of 2
        path.insert(0, first_hash)
    fn, sn = first - 1, second - 1
    while fn % 2 == 1:
        fn //= 2
        sn //= 2
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            fr = hash_children(c, fr)
            sr = hash_children(c, sr)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn //= 2
                    sn //= 2
        else:
            sr = hash_children(sr, c)
        fn //= 2
        sn //= 2
    return fr == first_hash and sr == second_hash and sn == 0


def open_signed_note(note: str, name: str, public_key: bytes) -> str:
    """C2SP signed-note: the note's text if one of its signature lines is a valid Ed25519 signature by
    the key `name` / `public_key` (key ID: the first 4 bytes of SHA-256(name || 0x0A || 0x01 || key));
    raises ValueError otherwise."""
    text, sep, signatures = note.rpartition("\n\n")
    if not sep or not note.endswith("\n"):
        raise ValueError("no blank line before the signatures, or no final newline")
    text += "\n"
    key_id = sha256(name.encode() + b"\x0a" + b"\x01" + public_key)[:4]
    for line in signatures[:-1].split("\n"):
        if not line.startswith("\u2014 "):
            raise ValueError(f"signature line without an em dash: {line!r}")
        signer, blob = line[2:].split(" ")
        signature = base64.b64decode(blob, validate=True)
        if signer == name and signature[:4] == key_id and len(signature) == 68:
            try:
                VerifyKey(public_key).verify(text.encode(), signature[4:])
            except BadSignatureError:
                raise ValueError("bad signature") from None
            return text
    raise ValueError("no signature by that key")


def parse_checkpoint(text: str) -> tuple[str, int, bytes, list[str]]:
    """C2SP tlog-checkpoint: (origin, tree size, root hash, extension lines)."""
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) >= 4, text
    origin, size, root, *extensions = lines[:-1]
    assert size.isdigit() and (size == "0" or not size.startswith("0")), size
    root_hash = base64.b64decode(root, validate=True)
    assert len(root_hash) == 32
    return origin, int(size), root_hash, extensions
