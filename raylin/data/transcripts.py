"""Transcripts for CTC speech recognition: raylin's character vocabulary, text normalisation, label
encoding and greedy CTC decoding (their word / character error rates: raylin.scoring).

The vocabulary is the 32 symbols of the English wav2vec2 CTC checkpoints (``facebook/wav2vec2-*-960h*``,
in their order): ``<pad>`` (also the CTC blank, id 0), ``<s>``, ``</s>``, ``<unk>``, the word
delimiter ``|`` (id 4), 26 upper-case letters and the apostrophe. A teacher fine-tuned with exactly
this vocabulary keeps its CTC head; a pretrained-only teacher (``facebook/wav2vec2-large-lv60``) gets
a new head of 32 outputs. Teachers with another CTC vocabulary are refused (``check_ctc_head``).

Normalisation (``normalize_transcript``): upper case, TED-LIUM's ``<unk>`` and bracketed noise marks
(``{NOISE}``, ``[laughter]``) dropped, digits spelled out word by word, every other character outside
the vocabulary dropped, runs of spaces collapsed. Limits: English letters only; numbers are spelled
digit by digit ("42" -> "FOUR TWO"), which is not how a speaker says them.
"""

from __future__ import annotations

import re

import torch

CTC_VOCAB = ("<pad>", "<s>", "</s>", "<unk>", "|", "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L", "U",
             "M", "W", "C", "F", "G", "Y", "P", "B", "V", "K", "'", "X", "J", "Q", "Z")
BLANK_ID = 0  # <pad>: transformers' Wav2Vec2ForCTC uses pad_token_id as the CTC blank
DELIMITER_ID = CTC_VOCAB.index("|")
_IDS = {symbol: i for i, symbol in enumerate(CTC_VOCAB)}
_DIGIT_WORDS = ("ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE")
_NOISE = re.compile(r"<unk>|\{[^}]*\}|\[[^\]]*\]|<[^>]*>", re.IGNORECASE)


def normalize_transcript(text: str) -> str:
    """Upper-case words over the vocabulary's letters and apostrophe, one space apart."""
    text = _NOISE.sub(" ", text).upper()
    text = re.sub(r"\d", lambda digit: f" {_DIGIT_WORDS[int(digit.group())]} ", text)
    text = "".join(c if c in _IDS and c != "|" else " " for c in text)  # single characters: letters, '"
    return " ".join(text.split())


def encode_transcripts(texts: list[str]) -> torch.Tensor:
    """CTC targets (batch, longest) of normalised ``texts``: spaces become ``|``; padded with -100."""
    rows = [[_IDS["|" if c == " " else c] for c in normalize_transcript(text)] for text in texts]
    labels = torch.full((len(rows), max((len(r) for r in rows), default=0) or 1), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        labels[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return labels


def ids_to_text(ids: list[int]) -> str:
    """Label ids (no blanks, no repeats to collapse) back to words."""
    symbols = [CTC_VOCAB[i] for i in ids if DELIMITER_ID <= i < len(CTC_VOCAB)]  # special tokens dropped
    return " ".join("".join(symbols).replace("|", " ").split())


def greedy_decode(logits: torch.Tensor, frame_mask: torch.Tensor | None = None) -> list[str]:
    """Best path per utterance: argmax per real frame, repeats merged, blanks dropped."""
    best = logits.argmax(-1).cpu()
    lengths = frame_mask.sum(-1).tolist() if frame_mask is not None else [best.shape[1]] * best.shape[0]
    texts = []
    for row, length in zip(best, lengths):
        path = torch.unique_consecutive(row[: int(length)]).tolist()
        texts.append(ids_to_text([i for i in path if i != BLANK_ID]))
    return texts


def check_ctc_head(config) -> None:
    """Refuse a teacher whose CTC head speaks another vocabulary than raylin's."""
    architectures = getattr(config, "architectures", None) or []
    if any(name.endswith("ForCTC") for name in architectures) and config.vocab_size != len(CTC_VOCAB):
        raise ValueError(
            f"The teacher's CTC head has {config.vocab_size} outputs; raylin's CTC vocabulary has {len(CTC_VOCAB)} "
            "(raylin.data.transcripts.CTC_VOCAB, the wav2vec2-960h characters). Use a teacher fine-tuned with "
            "that vocabulary, or its pretrained-only checkpoint (a new CTC head is made)."
        )
