"""The suite's own scheduling settings (tests/conftest.py): the modules it names exist, the compiled-kernel scope."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import COMPILING_MODULES, RUN_FIRST, compiled_kernel_scope

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_run_first_exists_once():
    assert len(set(RUN_FIRST)) == len(RUN_FIRST)
    assert [path for path in RUN_FIRST if not (ROOT / path).is_file()] == []
    assert [path for path in COMPILING_MODULES if not (ROOT / path).is_file()] == []


def test_compiled_kernel_tests_and_the_background_compile_tests_share_one_scope_and_other_tests_keep_their_module():
    cases = {
        "tests/featup/upsamplers/test_jbu.py::test_gradients_match_autograd_of_published_math[composed-compiled]": "compiled-kernels",
        "tests/featup/ops/test_adaptive_conv.py::test_adaptive_conv_backward_matches_autograd_of_reference[compiled]": "compiled-kernels",
        "tests/featup/test_checkpoint.py::test_reproduces_published_outputs[jbu_c64_14x14_to_224x224-compiled-composed]": "compiled-kernels",
        "tests/featup/ops/test_upsample_filter.py::test_matches_upsample_then_filter[compiled-2-5-3-7-7]": "compiled-kernels",
        "tests/featup/upsamplers/test_jbu.py::test_gradients_match_autograd_of_published_math[composed-eager]": None,
        "tests/featup/ops/test_compiled.py::test_compiles_wait_for_the_machine_lock": "compiled-kernels",
        "tests/jobs/test_precompute.py::test_x[not_compiled_here]": None,
    }
    assert {nodeid: compiled_kernel_scope(nodeid) for nodeid in cases} == cases
