"""The small tokenizer the built-in models ship with, and reading a ``tokenizer.json`` safely.

``tokenizer_builtin.json`` (next to this file) is a byte-level BPE of 512 entries: ids 0, 1, 2 are
``<pad>``, ``<bos>``, ``<eos>`` (the built-in models' EOS id is 2), then the 256 byte symbols,
then 253 merges learnt from ``CORPUS`` below. Any text encodes (unknown words fall back to
bytes) into ids below the built-in models' vocab_size of 512. The models' weights are random, so
the decoded output is meaningless text; the tokenizer only lets ``hal run --prompt TEXT`` work.

Regenerate the file (deterministic; a test checks the committed file is what this gives):

    python -m hal.models.tokenizer_builtin --write
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

BUILTIN_TOKENIZER_FILE = Path(__file__).with_name("tokenizer_builtin.json")
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
VOCAB_SIZE = 512

# Training text written for this file: plain English about running models, so common words and
# "hello world" become single tokens.
CORPUS = """\
hello world. hello again, world. the model reads a prompt and writes an answer.
a small model with random weights still runs every layer of the real architecture.
the tokens it writes are not meaningful, but the path through the code is the same one a
trained model takes: attention over the cache, the sparse indexer, the router and the experts.
this is a test of the runtime. the backend runs each operator and the plan says who ran what.
we measure how many tokens per second the prefill and the decode steps reach on this machine.
the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
one, two, three, four, five, six, seven, eight, nine, ten. first, second, third, last.
what is the time? where is the file? how large is the model? which device is this?
numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096.
the weather today is clear and cold; tomorrow there may be rain in the morning and wind at night.
please read the documentation before you change the configuration of the server.
an expert is a small network; the router picks a few experts for each token and mixes their outputs.
good morning, good evening, good night. thank you very much. you are welcome.
she said that the project would be finished by the end of the week, and it was.
they walked along the river to the old bridge, then turned back toward the town.
if the input is wrong, the program says so in one line and stops without writing anything.
people, water, light, house, school, city, country, language, number, question, answer.
"""


@functools.lru_cache(maxsize=1)
def builtin_tokenizer():
    """The shipped tokenizer (a ``tokenizers.Tokenizer``), or None when the ``tokenizers``
    package is not installed (``pip install 'hal[models]'``)."""
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return None
    return tokenizer_from_json(BUILTIN_TOKENIZER_FILE.read_text(encoding="utf-8"), str(BUILTIN_TOKENIZER_FILE))


def tokenizer_from_json(text: str, where: str, *, error=ValueError):
    """A ``tokenizers.Tokenizer`` from the text of a tokenizer.json, or None when the
    ``tokenizers`` package is not installed. Text that is not a tokenizer raises ``error``
    (one line naming ``where``)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # noqa: BLE001 - the Rust side raises a plain Exception for any malformed file
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise error(f"{where}: not a tokenizer.json the tokenizers package can read ({first})") from exc


def train(corpus: str = CORPUS, vocab_size: int = VOCAB_SIZE):
    """Train the byte-level BPE on ``corpus``: specials first, the 256 bytes, then merges up to
    ``vocab_size`` entries. Returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return tok


def to_json(tok) -> str:
    """The tokenizer's JSON, pretty-printed with sorted keys (stable under re-training)."""
    return json.dumps(json.loads(tok.to_str()), indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = to_json(train())
    if argv == ["--write"]:
        BUILTIN_TOKENIZER_FILE.write_text(text, encoding="utf-8")
        print(f"wrote {BUILTIN_TOKENIZER_FILE} ({len(text)} bytes)")
        return 0
    if argv == ["--check"]:
        same = BUILTIN_TOKENIZER_FILE.exists() and BUILTIN_TOKENIZER_FILE.read_text(encoding="utf-8") == text
        print("up to date" if same else f"{BUILTIN_TOKENIZER_FILE} is stale: run with --write")
        return 0 if same else 1
    print("usage: python -m hal.models.tokenizer_builtin --write | --check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
