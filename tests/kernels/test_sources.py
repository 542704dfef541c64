"""The CUDA sources: constants agree with kernels/spec.py, each compiles (once per `make test`; skipped
where nvcc is absent), the launcher knows each."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kernels import KernelUnavailable, select_kernels
from kernels.cuda import MODULES, SOURCES, defines, module_source


def test_header_defaults_are_the_spec():
    header = (SOURCES / "descriptor.cuh").read_text()
    defaults = dict(re.findall(r"#define (\w+) (\d+)", header))
    for flag in defines():
        name, value = flag[2:].split("=")
        assert defaults[name] == value, f"descriptor.cuh says {name}={defaults[name]}, spec says {value}"


def test_launcher_loads_every_source():
    assert sorted(MODULES) == sorted(p.stem for p in SOURCES.glob("*.cu"))
    for module in MODULES:
        assert '#include "descriptor.cuh"' not in module_source(module)


@pytest.fixture(scope="module")
def nvcc() -> str:
    path = shutil.which("nvcc")
    if path is None:
        pytest.skip("nvcc is not installed: the CUDA sources were not compiled")
    return path


@pytest.mark.parametrize("module", MODULES)
def test_each_source_compiles_as_the_launcher_compiles_it(nvcc, module, tmp_path: Path):
    """The one compile of each source: sm_90 machine code and compute_75 PTX (what a newer GPU's
    driver compiles at load), in one fat binary, from the text and flags the launcher uses."""
    source = tmp_path / f"{module}.cu"
    source.write_text(module_source(module))
    out = tmp_path / f"{module}.fatbin"
    targets = ["-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_75,code=compute_75"]
    done = subprocess.run(
        [nvcc, "--fatbin", *targets, *defines(), "-o", str(out), str(source)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"nvcc failed on {module}.cu:\n{done.stderr}"
    assert out.stat().st_size > 0


def test_without_a_gpu_auto_falls_back_to_the_cpu_reference_and_cuda_insists():
    try:
        cuda = select_kernels("cuda")
    except KernelUnavailable as exc:
        # Both launchers were tried, and each says why it cannot start.
        assert re.fullmatch(
            r"(PyCUDA is not installed|PyCUDA sees no CUDA device|CUDA does not start).*; "
            r"(neither PyCUDA nor CuPy is installed|CuPy sees no CUDA device|CUDA does not start).*",
            str(exc),
        ), str(exc)
        assert select_kernels("auto").name == "cpu"
    else:
        assert cuda.name == "cuda" and select_kernels("auto").name == "cuda"
    assert select_kernels("cpu").name == "cpu"
    with pytest.raises(ValueError) as error:
        select_kernels("opencl")
    assert str(error.value) == "kernel backend 'opencl' is not one of auto, cuda, cpu"
