"""μBench internal-service functions: the work a service does before calling others.

Behaviour follows μBench's service cell and CustomFunctions (github.com/mSvcBench/muBench):

- `compute_pi`: D digits of pi by Gibbons' unbounded spigot, D uniform in
  `range_complexity`; defaults `range_complexity [50, 100]`, `mean_response_size` 10.
- `loader`: stages run in order cpu -> memory -> disk -> sleep, each only if its
  `run` is true. Parameters are deep-merged over μBench's defaults, so an
  absent stage (or a stage without `run`) takes the default, and the sleep
  stage defaults to ON at 10 ms. `cpu_stress` starts `thread_pool_size` jobs in a
  thread pool; each job draws D once and computes pi `trials` times.
- `colosseum`: returns a fixed ASCII-art picture of the Colosseum and ignores
  its parameters (μBench's `CustomFunctions/Colosseum.py` does exactly that).

The response of `compute_pi` and `loader` is `int(max(1, 1000 * Exp(mean)))`
characters, `mean` = `mean_response_size` in kB.

Deliberate differences, all in the direction of doing the documented work:
memory is really touched (μBench's list of one interned string allocates
almost nothing), disk stress uses a private temp file (never the cwd), and
all randomness comes from the `random.Random` handed in so runs reproduce.

`scale` shrinks heavy workmodels for smoke tests. It multiplies the NUMBER of
pi computations (`trials` per job; the single computation of `compute_pi`),
stochastically rounded so the expected CPU work is exactly proportional (digits
are left alone: spigot cost is superlinear in D), and every sleep time.
Memory and disk stress are not scaled. A scale must be finite and >= 0
(`check_scale`).

The workmodel loader checks the parameters these built-ins read
(`mubench.workmodel._BUILTIN_PARAMS`), so the functions here can trust them.

Custom functions follow μBench's convention: every `*.py` file in the
functions directory not starting with `_` is imported and each public function
it defines becomes available by name, called as `function(params) -> str`.
A custom function replaces a built-in of the same name.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mubench.workmodel import Service, WorkmodelError

InternalFunction = Callable[[Mapping[str, Any], random.Random, float], str]

_LOADER_DEFAULTS: dict[str, Any] = {
    "cpu_stress": {
        "run": False,
        "range_complexity": [100, 100],
        "thread_pool_size": 1,
        "trials": 1,
    },
    "memory_stress": {"run": False, "memory_size": 10000, "memory_io": 1000},
    "disk_stress": {"run": False, "disk_write_block_count": 1000, "disk_write_block_size": 1024},
    "sleep_stress": {"run": True, "sleep_time": 0.01},
    "mean_response_size": 11,
}
_COMPUTE_PI_DEFAULTS: dict[str, Any] = {"range_complexity": [50, 100], "mean_response_size": 10}

_COLOSSEUM = r"""
                  _______________________________________
             _.-'|  _   _   _   _   _   _   _   _   _   |'-._
         _.-'    | | | | | | | | | | | | | | | | | | |  |    '-._
      .-'   _    | |_| |_| |_| |_| |_| |_| |_| |_| |_|  |    _   '-.
     /     | |   |______________________________________|   | |     \
    |  _   | |   |  _   _   _   _   _   _   _   _   _   |   | |   _  |
    | | |  |_|   | | | | | | | | | | | | | | | | | | |  |   |_|  | | |
    | |_|        | |_| |_| |_| |_| |_| |_| |_| |_| |_|  |        |_| |
    |____________|______________________________________|____________|
    |  _   _   _   _   _   _   _   _   _   _   _   _   _   _   _   _ |
    | | | | | | | | | | | | | | | | | | | | | | | | | | | | | | | | ||
    |_|_|_|_|_|_|_|_|_|_|_|_|_|_|_|_|_|_|_|_|_|_|_|_|_|_|_|_|_|_|_|_||
                     C O L O S S E V M   -   R O M A
"""


class FunctionsError(ValueError):
    """A custom-functions directory that cannot be loaded; `str()` is one line."""


def pi_digits(digits: int) -> str:
    """The first `digits` + 1 digits of pi ("3" then `digits` decimals), Gibbons' spigot."""
    q, r, t, k, n, m = 1, 0, 1, 1, 3, 3
    out: list[str] = []
    while len(out) <= digits:
        if 4 * q + r - t < n * t:
            out.append(str(n))
            q, r, n = 10 * q, 10 * (r - n * t), (10 * (3 * q + r)) // t - 10 * n
        else:
            q, r, t, k, n, m = (
                q * k,
                (2 * q + r) * m,
                t * m,
                k + 1,
                (q * (7 * k + 2) + r * m) // (t * m),
                m + 2,
            )
    return "".join(out)


def response_body(mean_kb: float, rng: random.Random) -> str:
    """μBench's dummy payload: an Exp(mean) number of kB, at least one character."""
    size = 1000 * rng.expovariate(1 / mean_kb) if mean_kb > 0 else 0
    return "m" * int(max(1, size))


def scaled_count(count: float, scale: float, rng: random.Random) -> int:
    """`count * scale`, rounded up with probability equal to its fraction (unbiased)."""
    exact = count * scale
    whole = int(exact)
    if exact == whole:
        return whole
    return whole + (rng.random() < exact - whole)


def check_scale(scale: float) -> float:
    """`scale` itself when usable; a negative or non-finite one would break every sleep."""
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"must be a finite number >= 0, got {scale!r}")
    return scale


def compute_pi(params: Mapping[str, Any], rng: random.Random, scale: float = 1.0) -> str:
    """CPU work: pi to D digits, D uniform in `range_complexity`; then the dummy payload."""
    p = _merged(_COMPUTE_PI_DEFAULTS, params)
    low, high = p["range_complexity"]
    digits = rng.randint(int(low), int(high))
    for _ in range(scaled_count(1, scale, rng)):
        pi_digits(digits)
    return response_body(p["mean_response_size"], rng)


def loader(params: Mapping[str, Any], rng: random.Random, scale: float = 1.0) -> str:
    """μBench's multi-stage load: cpu, memory, disk, sleep (each if `run`), then the payload."""
    p = _merged(_LOADER_DEFAULTS, params)
    if p["cpu_stress"]["run"]:
        _cpu_stress(p["cpu_stress"], rng, scale)
    if p["memory_stress"]["run"]:
        _memory_stress(p["memory_stress"], rng)
    if p["disk_stress"]["run"]:
        _disk_stress(p["disk_stress"], rng)
    if p["sleep_stress"]["run"]:
        time.sleep(float(p["sleep_stress"]["sleep_time"]) * scale)
    return response_body(p["mean_response_size"], rng)


def colosseum(params: Mapping[str, Any], rng: random.Random, scale: float = 1.0) -> str:
    """A constant ASCII-art body; like μBench's custom function it does no work."""
    return _COLOSSEUM


BUILTINS: dict[str, InternalFunction] = {
    "compute_pi": compute_pi,
    "loader": loader,
    "colosseum": colosseum,
}


def load_functions(functions_dir: str | None = None) -> dict[str, InternalFunction]:
    """The built-ins plus every custom function found in `functions_dir`."""
    functions = dict(BUILTINS)
    if functions_dir is None:
        return functions
    directory = Path(functions_dir)
    if not directory.is_dir():
        raise FunctionsError(f"{functions_dir}: not a directory")
    origin: dict[str, Path] = {}
    for path in sorted(directory.glob("[!_]*.py")):
        for name, func in _public_functions(path).items():
            if name in origin:
                raise FunctionsError(
                    f"{path}: function '{name}' is also defined in {origin[name].name}"
                )
            origin[name] = path
            functions[name] = _adapt_custom(func)
    return functions


def custom_function_names(functions_dir: str | Path | None) -> frozenset[str]:
    """Names of the custom functions in `functions_dir` (importing them), for the loader."""
    if functions_dir is None:
        return frozenset()
    return custom_names(load_functions(str(functions_dir)))


def custom_names(functions: Mapping[str, InternalFunction]) -> frozenset[str]:
    """Names served by a custom function: the workmodel loader leaves their parameters free-form."""
    return frozenset(name for name, func in functions.items() if BUILTINS.get(name) is not func)


def check_functions(
    service: Service, functions: Mapping[str, InternalFunction], source: str = "workmodel.json"
) -> None:
    """Fail at start-up, not on every request, when a behaviour names an unknown function."""
    for bid, behavior in {"default": service.behavior, **service.alternatives}.items():
        if behavior.function not in functions:
            raise WorkmodelError(
                f"{source}: service '{service.id}': behaviour '{bid}': unknown internal "
                f"function '{behavior.function}' (known: {', '.join(sorted(functions))})"
            )


def _public_functions(path: Path) -> dict[str, Callable[..., Any]]:
    """Import one custom-function file and list the functions it defines itself."""
    module_name = f"mubench_custom_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise FunctionsError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise FunctionsError(f"{path}: import failed: {type(e).__name__}: {e}") from None
    return {
        name: obj
        for name, obj in vars(module).items()
        if inspect.isfunction(obj) and obj.__module__ == module_name and not name.startswith("_")
    }


def _adapt_custom(func: Callable[[Any], Any]) -> InternalFunction:
    """μBench custom functions take only `params` and should return a string."""

    def run(params: Mapping[str, Any], rng: random.Random, scale: float = 1.0) -> str:
        return str(func(copy.deepcopy(dict(params))))

    run.__name__ = func.__name__
    return run


def _merged(defaults: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of `params` over `defaults` (μBench uses jsonmerge the same way)."""
    result = copy.deepcopy(dict(defaults))
    for key, value in params.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), dict):
            result[key] = _merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _cpu_stress(p: Mapping[str, Any], rng: random.Random, scale: float) -> None:
    """`thread_pool_size` jobs in parallel, each computing pi `trials` times."""
    pool_size = int(p["thread_pool_size"])
    trials = scaled_count(int(p["trials"]), scale, rng)
    low, high = p["range_complexity"]
    # Draw every job's D here so the outcome does not depend on thread scheduling.
    job_digits = [rng.randint(int(low), int(high)) for _ in range(pool_size)]
    with ThreadPoolExecutor(pool_size) as pool:
        for future in [pool.submit(_pi_job, d, trials) for d in job_digits]:
            future.result()


def _pi_job(digits: int, trials: int) -> None:
    for _ in range(trials):
        pi_digits(digits)


def _memory_stress(p: Mapping[str, Any], rng: random.Random) -> None:
    """Allocate `memory_size` kB (really touched), then `memory_io` 1-byte reads/writes."""
    size = int(p["memory_size"]) * 1000
    if size <= 0:
        return
    buffer = bytearray(b"A") * size
    for _ in range(int(p["memory_io"])):
        i = rng.randrange(size)
        buffer[i] = (buffer[i] + 1) & 0xFF


def _disk_stress(p: Mapping[str, Any], rng: random.Random) -> None:
    """Write blocks to a private temp file, fsync, read them back shuffled, delete it."""
    count = int(p["disk_write_block_count"])
    block = int(p["disk_write_block_size"])
    fd, name = tempfile.mkstemp(prefix="mubench-disk-")
    try:
        for _ in range(count):
            os.write(fd, rng.randbytes(block))
        os.fsync(fd)
        offsets = [i * block for i in range(count)]
        rng.shuffle(offsets)
        for offset in offsets:
            os.pread(fd, block, offset)
    finally:
        os.close(fd)
        os.unlink(name)
