"""Calibration and evaluation text: hub datasets by the names LMDeploy users know, or any local file.

Windows are cut from one long token stream at seeded, non-overlapping positions, so a run is repeatable.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import QuantError

# name -> (datasets.load_dataset args, split, text field); loaded only when the hub is reachable.
HUB_DATASETS: dict[str, tuple[tuple, dict, str, str]] = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {}, "train", "text"),
    "ptb": (("ptb_text_only", "penn_treebank"), {"trust_remote_code": True}, "train", "sentence"),
    "c4": (("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}}, "train", "text"),
    "pileval": (("mit-han-lab/pile-val-backup",), {}, "validation", "text"),
}
TEXT_SUFFIXES = {".txt", ".raw", ".tokens", ".text", ".md"}
BUILTIN_CALIB = Path(__file__).resolve().parent / "data" / "calib.txt"


def read_texts(path: Path) -> list[str]:
    """Documents of a local file: ``.txt``-like (one document per line), ``.jsonl`` or ``.parquet`` (``text`` field)."""
    path = Path(path)
    if not path.is_file():
        raise QuantError(f"calibration/evaluation file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return path.read_text(encoding="utf-8").splitlines()
    if suffix in (".jsonl", ".json"):
        texts = []
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if "text" not in record:
                    raise QuantError(f"{path}:{n}: a .jsonl record needs a 'text' field")
                texts.append(record["text"])
        return texts
    if suffix == ".parquet":
        import datasets

        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        if "text" not in ds.column_names:
            raise QuantError(f"{path}: a .parquet file needs a 'text' column, it has {ds.column_names}")
        return list(ds["text"])
    raise QuantError(f"{path}: unknown file type {suffix!r}; use .txt, .jsonl (text field) or .parquet")


def hub_texts(name: str, max_docs: int = 20000) -> list[str]:
    """Texts of a named hub dataset; a clear error when the hub cannot be reached."""
    args, kwargs, split, field = HUB_DATASETS[name]
    try:
        import datasets

        ds = datasets.load_dataset(*args, split=split, **kwargs)
    except Exception as exc:  # offline, or the hub refused: the fix is a local file
        raise QuantError(
            f"could not load calibration dataset {name!r} from the Hugging Face hub ({type(exc).__name__}); "
            f"offline, pass --calib-dataset PATH (a .txt, .jsonl or .parquet file)"
        ) from exc
    return [t for t in ds.select(range(min(max_docs, len(ds))))[field] if t and t.strip()]


def load_texts(dataset: str) -> list[str]:
    """Resolve ``--calib-dataset``: a hub name, ``builtin``, or a local path."""
    if dataset in HUB_DATASETS:
        return hub_texts(dataset)
    if dataset == "builtin":
        return read_texts(BUILTIN_CALIB)
    if Path(dataset).exists():
        return read_texts(Path(dataset))
    raise QuantError(
        f"--calib-dataset {dataset!r} is neither a file nor a known dataset ({', '.join(HUB_DATASETS)}, builtin); "
        f"pass --calib-dataset PATH to a .txt, .jsonl or .parquet file"
    )


def token_stream(texts: list[str], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize the joined text once (no special tokens); stop early once ``max_tokens`` are surely covered."""
    text = "\n".join(t for t in texts if t is not None)
    if max_tokens is not None:
        # ~4 characters a token in English; take 3x that so the cut never starves the windows.
        text = text[: max_tokens * 12]
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(texts: list[str], tokenizer, n_samples: int, seqlen: int, seed: int = 42) -> torch.Tensor:
    """``[n_samples, seqlen]`` token ids from non-overlapping windows at seeded positions."""
    if n_samples < 1 or seqlen < 1:
        raise QuantError("--calib-samples and --calib-seqlen must be positive")
    stream = token_stream(texts, tokenizer, max_tokens=n_samples * seqlen * 2)
    n_windows = stream.numel() // seqlen
    if n_windows < n_samples:
        raise QuantError(
            f"the calibration text has {stream.numel()} tokens: {n_windows} windows of {seqlen}, "
            f"fewer than --calib-samples {n_samples}; pass a larger file or lower --calib-samples/--calib-seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(n_windows, generator=g)[:n_samples].sort().values
    return torch.stack([stream[i * seqlen : (i + 1) * seqlen] for i in picks.tolist()])
