"""Turn a Llama 3.x HF checkpoint into a speech-ready one by appending DSU and modality tokens.

Every id of the base model keeps its value (docs/vocabulary.md): new rows are appended to the input
embedding (and to the output head when it is untied). Weights are streamed tensor by tensor from
the safetensors bytes, kernel to kernel (`copy_file_range`), so peak memory is a fraction of the model
and base rows stay bit-identical; the new rows (`ssi.vocab.new_rows`) are fitted in a thread while the
unchanged tensors are copied, and the extended matrices are written last. The command imports numpy but
not torch: extension costs little more than copying the checkpoint (bench/bench_extend.py).
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import BinaryIO

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from ssi import report_error, setup_cli_logging
from ssi.files import FileFormatError, atomic_output_dir, write_json
from ssi.hf_dir import (
    MANIFEST_NAME,
    SAFETENSORS_INDEX,
    TIKTOKEN_FILE,
    ModelDirError,
    TensorEntry,
    copy_byte_range,
    f32_to_bytes,
    read_llama_config,
    read_model_json,
    read_safetensors_header,
    weight_files,
    write_safetensors,
)
from ssi.vocab import specials
from ssi.vocab.hf_tokenizer import check_not_extended, extend_hf_tokenizer
from ssi.vocab.layout import MAX_DSUS, SpeechVocab, VocabError, count_bpe_ranks
from ssi.vocab.new_rows import INIT_METHODS, new_rows

log = logging.getLogger(__name__)

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", TIKTOKEN_FILE)
# Written here rather than copied from the input.
_GENERATED = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    SAFETENSORS_INDEX,
    MANIFEST_NAME,
    "original/params.json",
}


class ExtensionError(ValueError):
    """An input the extension refuses; nothing has been written when it is raised."""


def default_output_dir(input_dir: Path, n_new_dsus: int) -> Path:
    """`<model name>-<N>-dsus` in the working directory; a hub-cache snapshot is named after its repo."""
    name = input_dir.resolve().name
    match = re.search(r"models--[^/]+--([^/]+)/snapshots/[^/]+$", str(input_dir.resolve()))
    if match:
        name = match.group(1)
    return Path.cwd() / f"{name}-{n_new_dsus}-dsus"


def resolve_input_dir(input_dir: str) -> Path:
    """A local directory, or a hub repo id already in the local HF cache (never downloads)."""
    path = Path(input_dir).expanduser()
    if path.exists() or "/" not in input_dir or input_dir.startswith((".", "/", "~")):
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(input_dir, local_files_only=True))
    except Exception:
        raise ExtensionError(
            f"{input_dir} is neither a local directory nor a model in the local Hugging Face cache. "
            f"Download it first: huggingface-cli download {input_dir} --local-dir <dir> "
            "(include original/tokenizer.model), then pass --input_dir <dir>"
        ) from None


def _check_model_files(input_dir: Path) -> tuple[dict, int, list[Path]]:
    """Validate what the weights need; returns (config, n_bpe, weight files). Raises ExtensionError."""
    try:
        config = read_llama_config(input_dir)
    except ModelDirError as err:
        raise ExtensionError(str(err)) from None
    if (input_dir / MANIFEST_NAME).exists():
        raise ExtensionError(
            f"{input_dir} is already extended ({MANIFEST_NAME} present); extend the base model instead"
        )
    missing = [f for f in REQUIRED_FILES if not (input_dir / f).is_file()]
    if missing:
        hint = " (download it with the model: it is under original/ on the hub)" if TIKTOKEN_FILE in missing else ""
        raise ExtensionError(f"{input_dir} is missing required files: {', '.join(missing)}{hint}")
    try:
        files = weight_files(input_dir)
    except ModelDirError as err:
        raise ExtensionError(str(err)) from None
    return config, count_bpe_ranks(input_dir / TIKTOKEN_FILE), files


def _read_base_tokenizer(input_dir: Path, config: dict, n_bpe: int) -> tuple[dict[str, int], dict, dict]:
    """The special-token table, tokenizer.json and tokenizer_config.json of the base, checked against each
    other and against config.json. Raises ExtensionError."""
    tokenizer_json = read_model_json(input_dir / "tokenizer.json")
    tokenizer_config = read_model_json(input_dir / "tokenizer_config.json")
    try:
        check_not_extended(tokenizer_json, str(input_dir / "tokenizer.json"))
        table = specials.special_tokens_of(tokenizer_json, tokenizer_config, n_bpe, str(input_dir))
    except (VocabError, specials.SpecialTokenError) as err:
        raise ExtensionError(str(err)) from None
    expected = n_bpe + len(table)
    if config.get("vocab_size") != expected:
        raise ExtensionError(
            f"{input_dir / 'config.json'}: vocab_size is {config.get('vocab_size')}, but the base vocabulary "
            f"({n_bpe} ranks in {TIKTOKEN_FILE} + {len(table)} special tokens) has {expected}: already extended, "
            "or the files belong to different models"
        )
    return table, tokenizer_json, tokenizer_config


def _find_entries(files: list[Path]) -> dict[str, tuple[Path, TensorEntry]]:
    found = {}
    for path in files:
        entries, _ = read_safetensors_header(path)
        for entry in entries:
            if entry.name in (EMBED, LM_HEAD):
                found[entry.name] = (path, entry)
    return found


def extend_model_dir(
    input_dir: str | Path,
    output_dir: str | Path | None,
    n_new_dsus: int,
    *,
    modality_tokens: bool = True,
    init: str = "multivariate_normal",
    seed: int = 42,
    overwrite: bool = False,
    dsu_encoder: str | None = None,
    frame_rate: float | None = None,
    progress: bool = True,
) -> Path:
    """Write an extended copy of `input_dir`; returns the output directory. Raises ExtensionError
    (before writing anything) on bad input."""
    if not 0 < n_new_dsus <= MAX_DSUS:
        raise ExtensionError(
            f"--n_new_dsus must be between 1 and {MAX_DSUS} (Private Use Area capacity), got {n_new_dsus}"
        )
    if init not in INIT_METHODS:
        raise ExtensionError(f"--init must be one of {INIT_METHODS}, got {init!r}")
    input_dir = Path(input_dir)
    config, n_bpe, files = _check_model_files(input_dir)
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(input_dir, n_new_dsus)
    if output_dir.resolve() == input_dir.resolve() or input_dir.resolve() in output_dir.resolve().parents:
        raise ExtensionError(f"output directory {output_dir} must not be the input directory or inside it")
    if output_dir.exists() and not overwrite:
        raise ExtensionError(f"output directory {output_dir} already exists; pass --overwrite to replace it")
    matrices = _find_entries(files)
    n_new = SpeechVocab(n_bpe, n_new_dsus, modality_tokens).n_appended

    t0 = time.perf_counter()
    # One worker fits the new rows, from now on, and then writes the small files; the main thread checks the
    # tokenizer and the matrices meanwhile (a refusal discards the fit) and then copies the weights, kernel
    # to kernel (numpy's BLAS and copy_file_range both release the GIL). The extended matrices are written
    # last, once their new rows exist.
    with ThreadPoolExecutor(max_workers=1) as pool:
        rows = pool.submit(_new_rows, matrices, config, n_bpe, n_new, init, seed)
        table, tokenizer_json, tokenizer_config = _read_base_tokenizer(input_dir, config, n_bpe)
        _check_matrices(matrices, config, input_dir)
        vocab = SpeechVocab(
            n_bpe, n_new_dsus, modality_tokens, _base_model_name(input_dir), dsu_encoder, frame_rate, table
        )
        try:
            tokenizer_json, tokenizer_config = extend_hf_tokenizer(tokenizer_json, tokenizer_config, vocab)
        except ValueError as err:
            raise ExtensionError(f"{input_dir / 'tokenizer.json'}: {err}") from None
        with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
            small_files = pool.submit(
                _write_small_files, input_dir, tmp, config, vocab, tokenizer_json, tokenizer_config
            )
            try:
                _write_weights(files, tmp, set(matrices), rows, n_new, progress)
            finally:
                wait([small_files])  # it writes into tmp: done before tmp is either kept or removed
            small_files.result()
            vocab.save(tmp, extra={"extension": {"init": init, "seed": seed, "n_new_rows": n_new}})
    log.info(
        "wrote %s (vocab %d -> %d) in %.1fs",
        output_dir,
        vocab.base_vocab_size,
        vocab.vocab_size,
        time.perf_counter() - t0,
    )
    return output_dir


def _new_rows(
    matrices: dict[str, tuple[Path, TensorEntry]], config: dict, n_bpe: int, n_new: int, init: str, seed: int
) -> dict[str, bytes]:
    """The bytes of the rows appended to the input embedding and, when present, the output head."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    rows: dict[str, bytes] = {}
    # one BLAS thread: the other core copies the unchanged tensors meanwhile (kernel-side, no GIL)
    with threadpool_limits(limits=1, user_api="blas"):
        for name in (EMBED, LM_HEAD):
            if name not in matrices:
                continue
            if name == LM_HEAD and config.get("tie_word_embeddings", False):
                rows[name] = rows[EMBED]  # tied weights stored twice stay equal
            else:
                path, entry = matrices[name]
                rows[name] = f32_to_bytes(new_rows(path, entry, n_bpe, n_new, init, rng), entry.dtype)
    log.info("fitted %s init for %d new rows in %.1fs", init, n_new, time.perf_counter() - t0)
    return rows


def _base_model_name(input_dir: Path) -> str:
    match = re.search(r"models--([^/]+)--([^/]+)/snapshots/", str(input_dir.resolve()))
    return f"{match.group(1)}/{match.group(2)}" if match else input_dir.resolve().name


def _check_matrices(matrices: dict, config: dict, input_dir: Path) -> None:
    if EMBED not in matrices:
        raise ExtensionError(f"{input_dir}: no tensor named {EMBED} in the safetensors files")
    if not config.get("tie_word_embeddings", False) and LM_HEAD not in matrices:
        raise ExtensionError(f"{input_dir}: tie_word_embeddings is false but {LM_HEAD} is missing")
    for name, (path, entry) in matrices.items():
        if len(entry.shape) != 2 or entry.shape[0] != config["vocab_size"]:
            raise ExtensionError(
                f"{path}: {name} has shape {list(entry.shape)}, expected [{config['vocab_size']}, hidden] "
                "(rows must match config.json vocab_size so that new ids can be appended)"
            )


def _write_small_files(
    input_dir: Path, out: Path, config: dict, vocab: SpeechVocab, tokenizer_json: dict, tokenizer_config: dict
) -> None:
    """Everything but the weights and ssi.json: side files, the extended tokenizer and the configs."""
    _copy_side_files(input_dir, out)
    # compact: json's C encoder writes these (10+ MB, thousands of added tokens) several times faster
    write_json(out / "tokenizer.json", tokenizer_json, indent=None)
    write_json(out / "tokenizer_config.json", tokenizer_config, indent=None)
    _write_configs(input_dir, out, config, vocab)


def _copy_side_files(input_dir: Path, out: Path) -> None:
    """Licences, READMEs, original/tokenizer.model...: everything but weights and generated files.
    Meta-format consolidated weights are skipped: they would not match the extended vocabulary."""
    for src in sorted(input_dir.rglob("*")):
        rel = src.relative_to(input_dir)
        if (
            src.is_dir()
            or rel.parts[0].startswith(".")
            or rel.as_posix() in _GENERATED
            or src.suffix in (".safetensors", ".pth", ".bin", ".pt")
        ):
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / rel)


def _write_configs(input_dir: Path, out: Path, config: dict, vocab: SpeechVocab) -> None:
    write_json(out / "config.json", {**config, "vocab_size": vocab.vocab_size})
    gen_path = input_dir / "generation_config.json"
    gen = read_model_json(gen_path) if gen_path.is_file() else {}
    gen.setdefault("bos_token_id", config.get("bos_token_id"))
    gen.setdefault("eos_token_id", config.get("eos_token_id"))
    write_json(out / "generation_config.json", gen)
    special_map_path = input_dir / "special_tokens_map.json"
    special_map = read_model_json(special_map_path) if special_map_path.is_file() else {}
    for key, token in (("bos_token", specials.BOS), ("eos_token", specials.EOS)):
        special_map.setdefault(key, token)
    write_json(out / "special_tokens_map.json", special_map)
    params_path = input_dir / "original" / "params.json"
    if params_path.is_file():
        write_json(out / "original" / "params.json", {**read_model_json(params_path), "vocab_size": vocab.vocab_size})


def _write_weights(files: list[Path], out: Path, extended: set[str], rows: Future, n_new: int, progress: bool) -> None:
    """Copy every shard, appending `rows.result()[name]` to each matrix named in `extended`.
    Extended matrices go last in their shard, so everything else is written while the fit runs."""
    total_bytes = sum(f.stat().st_size for f in files)
    added_bytes, waited, t0 = 0, 0.0, time.perf_counter()
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="writing weights", disable=not progress) as bar:
        for path in files:
            entries, metadata = read_safetensors_header(path)
            entries.sort(key=lambda e: e.name in extended)  # stable: file order, extended matrices last
            layout = [
                (e.name, e.dtype, (e.shape[0] + n_new, *e.shape[1:]) if e.name in extended else e.shape)
                for e in entries
            ]
            with open(path, "rb") as src:

                def write(i: int, dst: BinaryIO, src: BinaryIO = src, entries: list = entries) -> None:
                    nonlocal waited
                    entry = entries[i]
                    copy_byte_range(src, dst, entry.start, entry.nbytes)
                    if entry.name in extended:
                        before = time.perf_counter()
                        dst.write(rows.result()[entry.name])
                        waited += time.perf_counter() - before
                    bar.update(entry.nbytes)

                added_bytes += write_safetensors(out / path.name, layout, write, metadata)
    elapsed = time.perf_counter() - t0
    log.info(
        "wrote %.2f GB of weights in %.1fs (%.2f GB/s), %.1fs of it waiting for the new rows",
        total_bytes / 1e9,
        elapsed,
        total_bytes / 1e9 / elapsed,
        waited,
    )
    if (files[0].parent / SAFETENSORS_INDEX).is_file():
        index = read_model_json(files[0].parent / SAFETENSORS_INDEX)
        index.setdefault("metadata", {})["total_size"] = added_bytes
        write_json(out / SAFETENSORS_INDEX, index)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extend_llama3_2.py",
        description="Append N discrete-speech-unit tokens (and two modality tokens) to a Llama 3.x HF checkpoint.",
    )
    parser.add_argument("--n_new_dsus", "--n-new-dsus", type=int, required=True, help="number of DSU tokens to add")
    parser.add_argument(
        "--input_dir",
        "--input-dir",
        default="meta-llama/Llama-3.2-1B",
        help="HF-format Llama 3.x directory, or a hub id already in the local HF cache (default: %(default)s)",
    )
    parser.add_argument(
        "--output_dir",
        "--output-dir",
        default=None,
        help="where to write the extended model (default: ./<input name>-<N>-dsus)",
    )
    parser.add_argument(
        "--no-modality-tokens",
        "--no_modality_tokens",
        dest="modality_tokens",
        action="store_false",
        help="do not add <extra_id_MM_TEXT> / <extra_id_MM_SPEECH>",
    )
    parser.add_argument(
        "--init",
        choices=INIT_METHODS,
        default="multivariate_normal",
        help="initialisation of new embedding rows (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed for the new rows (default: %(default)s)")
    parser.add_argument(
        "--dsu_encoder",
        "--dsu-encoder",
        default=None,
        help="name of the DSU encoder, recorded in ssi.json (e.g. hubert-large-l22-km5000)",
    )
    parser.add_argument(
        "--frame_rate",
        "--frame-rate",
        type=float,
        default=None,
        help="DSU frame rate in Hz, recorded in ssi.json (e.g. 50 for HuBERT)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli_logging()
    try:
        input_dir = resolve_input_dir(args.input_dir)
        out = extend_model_dir(
            input_dir,
            args.output_dir,
            args.n_new_dsus,
            modality_tokens=args.modality_tokens,
            init=args.init,
            seed=args.seed,
            overwrite=args.overwrite,
            dsu_encoder=args.dsu_encoder,
            frame_rate=args.frame_rate,
            progress=args.progress,
        )
    except (ExtensionError, ModelDirError, FileFormatError, FileExistsError) as err:
        return report_error(err)
    print(out)
    return 0
