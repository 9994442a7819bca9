"""The VIRST chat prompt: Qwen2 chat template, the video in place of `<image>`, and an
answer that already holds the 10 `[SEG]` tokens (one prefill, nothing generated).

Deterministic choice of the release's randomly drawn templates: the first question of the
short list (or of the long list when the expression ends with "?"), and the answer
"Sure, it is (0) [SEG], (1) [SEG], ..., (9) [SEG].".
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel

from virst.errors import CheckpointError, InputError

SEG_TOKEN, IMAGE_TOKEN = "[SEG]", "<image>"
SYSTEM = "You are a helpful assistant."
SHORT_QUESTION = ("Reference image: <image> \nWhat is {sent} in the Reference image? "
                  "Please respond with segmentation mask in the Target Image.")
LONG_QUESTION = ("Reference image: <image> \n{sent} Please find it in the Reference image "
                 "and respond with segmentation mask in the Target Image.")
ANSWER = "Sure, it is {seg}."

# Word-level tokenizer of the tiny preset: fixed ids for the special tokens.
TINY_SPECIAL = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>", SEG_TOKEN, IMAGE_TOKEN]
TINY_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny-tokenizer"


def normalize_expression(expression: str) -> str:
    """Lower case, single spaces (as the release's dataset loaders do)."""
    if not isinstance(expression, str) or not expression.strip():
        raise InputError("the expression is empty: describe the object to segment")
    return " ".join(expression.lower().split())


def _message(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


@dataclass(frozen=True)
class Prompt:
    """Token ids around the video; `after` runs to the end of the conversation."""

    before: tuple[int, ...]
    after: tuple[int, ...]
    seg_index: tuple[int, ...]  # positions of [SEG] inside `after`
    answer_start: int  # position inside `after` of the assistant message's first token

    def seg_positions(self, video_tokens: int) -> list[int]:
        """Absolute positions of the [SEG] tokens once `video_tokens` embeddings are inserted."""
        offset = len(self.before) + video_tokens
        return [offset + i for i in self.seg_index]

    @property
    def inference_after(self) -> tuple[int, ...]:
        """Tokens after the last [SEG] cannot influence it (causal LM): not computed."""
        return self.after[: self.seg_index[-1] + 1]


def build_prompt(tokenizer: Tokenizer, expression: str, num_seg: int = 10) -> Prompt:
    sent = normalize_expression(expression)
    question = (LONG_QUESTION if sent.endswith("?") else SHORT_QUESTION).format(sent=sent)
    seg = ", ".join(f"({i}) {SEG_TOKEN}" for i in range(num_seg))
    head, tail = question.split(IMAGE_TOKEN)
    before = _message("system", SYSTEM) + "<|im_start|>user\n" + head
    middle = tail + "<|im_end|>\n"
    answer = _message("assistant", ANSWER.format(seg=seg))

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    after_q, after_a = ids(middle), ids(answer)
    after = tuple(after_q + after_a)
    seg_id = tokenizer.token_to_id(SEG_TOKEN)
    seg_index = tuple(i for i, t in enumerate(after) if t == seg_id)
    if len(seg_index) != num_seg:
        raise CheckpointError(
            f"the tokenizer split the prompt into {len(seg_index)} {SEG_TOKEN} tokens, "
            f"expected {num_seg}: is {SEG_TOKEN} an added token of this tokenizer?"
        )
    return Prompt(tuple(ids(before)), after, seg_index, len(after_q))


def build_word_tokenizer(words: list[str]) -> Tokenizer:
    """A lower-casing word-level tokenizer; special tokens match before splitting."""
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL)}
    for word in sorted(set(words) - set(vocab)):
        vocab[word] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in TINY_SPECIAL])
    return tok


def placeholder_tokenizer(cfg) -> Tokenizer:
    """The tiny word-level vocabulary with [SEG] at `cfg.seg_token_id`: prompts of the right
    shape for a model of random weights whose real tokenizer is not at hand."""
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL)}
    vocab[SEG_TOKEN] = cfg.seg_token_id
    taken = set(vocab.values())
    free = (i for i in itertools.count() if i not in taken)  # no id given twice
    for word in sorted(set(tiny_words()) - set(vocab)):
        vocab[word] = next(free)
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in TINY_SPECIAL])
    return tok


def tiny_words() -> list[str]:
    lines = (TINY_TOKENIZER_DIR / "words.txt").read_text().splitlines()
    return [w for line in lines if not line.startswith("#") for w in line.split()]


def load_tokenizer(folder: str | Path) -> Tokenizer:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"no tokenizer.json in {folder}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise CheckpointError(f"cannot read tokenizer {path}: {err}") from err


if __name__ == "__main__":  # regenerate the shipped tiny tokenizer from words.txt
    build_word_tokenizer(tiny_words()).save(str(TINY_TOKENIZER_DIR / "tokenizer.json"))
    print(f"wrote {TINY_TOKENIZER_DIR / 'tokenizer.json'}")
