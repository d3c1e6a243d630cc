"""tiktoken's ``gpt2`` encoding, built from the BPE files shipped in the package.

``tiktoken.get_encoding("gpt2")`` downloads OpenAI's files on first use, which fails
offline and makes every Ray worker fetch its own copy. The files here are the very ones
tiktoken checks against (same SHA-256), so the encoding is the same, token for token.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from spam_gpt.corpus import sha256_hex

ENDOFTEXT = "<|endoftext|>"
PAD_TOKEN_ID = 50256
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def _read_checked(name: str, expected: str) -> bytes:
    raw = resources.files("spam_gpt").joinpath("assets", "gpt2_bpe", name).read_bytes()
    if sha256_hex(raw) != expected:
        raise RuntimeError(f"the bundled GPT-2 BPE file {name} is damaged; reinstall spam-gpt")
    return raw


def gpt2_byte_decoder() -> dict[str, int]:
    """Map GPT-2's printable stand-in characters back to the bytes they encode.

    GPT-2 stores tokens as text: printable Latin-1 bytes stand for themselves and the
    other bytes are shifted to code points 256 and up, in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    stand_in = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in stand_in)
    for offset, byte in enumerate(shifted):
        stand_in[byte] = chr(256 + offset)
    return {char: byte for byte, char in stand_in.items()}


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The ``gpt2`` encoding with no network and no cache folder."""
    encoder = json.loads(_read_checked("encoder.json", ENCODER_JSON_SHA256))
    _read_checked("vocab.bpe", VOCAB_BPE_SHA256)  # merges are implied by ranks; check anyway
    decode = gpt2_byte_decoder()
    ranks = {
        bytes(decode[char] for char in token): rank
        for token, rank in encoder.items()
        if token != ENDOFTEXT
    }
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: PAD_TOKEN_ID},
        explicit_n_vocab=50257,
    )


def encode_text(text: str) -> list[int]:
    """Token ids of a message, read as plain text.

    A message that happens to contain ``<|endoftext|>`` is encoded as those characters,
    not as the special token: user text must not be able to inject padding or crash.
    """
    return get_tokenizer().encode_ordinary(text)
