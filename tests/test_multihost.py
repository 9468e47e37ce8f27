"""Multi-process search (search.multihost): 2 CPU processes on 127.0.0.1 vs one process.

Each process is a fresh Python (jax.distributed must be initialized before JAX
starts a backend). Both children of the 2-process run and the single-process
run build the same tiny problem and run the same few generations; the best
masks and the history must agree.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import FAST_COMPILE_FLAG

from jaxsplit.search import multihost as MH

CHILD = textwrap.dedent(r"""
    import json, sys
    num_processes, process_id, address = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    from jaxsplit.search import multihost as MH
    if num_processes > 1:
        MH.initialize(address, num_processes, process_id, timeout_s=60)
    import jax, jax.numpy as jnp, numpy as np
    from jaxsplit.models.convnet import ConvLayerDef, ConvNet, init_params
    from jaxsplit.search import driver as D, evaluate as E
    from jaxsplit.search.config import SearchConfig

    model = ConvNet(convs=(ConvLayerDef(4), ConvLayerDef(6, pool=True),
                           ConvLayerDef(6, residual_from=1)),
                    hidden=(8,), head_dropout=(0.0, 0.0), num_classes=3, in_channels=1,
                    image_size=8)
    spec = model.conv_spec()
    params = {"params": jax.device_get(jax.jit(lambda k: init_params(model, k))(jax.random.key(0)))}
    rng = np.random.default_rng(0)
    N, C = 24, 3
    images = rng.normal(size=(N, 8, 8, 1)).astype(np.float32)
    labels = (np.arange(N) % C).astype(np.int32)
    classes = np.arange(C, dtype=np.int32)
    importance = {n: rng.random((C, spec.layer(n).num_kernels)).astype(np.float32)
                  for n in spec.names}
    out = {"process_count": jax.process_count(), "device_count": jax.device_count(),
           "runs": {}}
    backends = ["reference", "fast"]
    for backend in backends:
        cfg = SearchConfig(population_size=5, num_generations=1, backend=backend,
                           chunk_individuals=4, chunk_images=8, min_kept_ensembles=3,
                           max_kept_ensembles=10, seed=1)
        fn = E.make_evaluator_from_config(model, cfg)
        problem, settings = D.build_problem(model, "weak_cnn", importance, cfg, evaluate_fn=fn)
        res = MH.run_search(problem, settings, params, images, labels, classes, seed=cfg.seed,
                            population_size=cfg.population_size,
                            num_generations=cfg.num_generations)
        out["runs"][backend] = {
            "evaluator": type(fn).__name__, "num_devices": res.num_devices,
            "masks": {k: v.astype(int).tolist() for k, v in res.best_masks.items()},
            "history": res.history}
    print("RESULT " + json.dumps(out), flush=True)
""")

TIMEOUT_S = 240  # far above the ~30 s of an idle 2-core machine: the cores are shared


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(num_processes: int) -> list[subprocess.Popen]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    # one CPU device per process; the suite's fast-compile flag (tests/conftest.py) stays
    flags = " ".join(f for f in env.pop("XLA_FLAGS", "").split() if f == FAST_COMPILE_FLAG)
    if flags:
        env["XLA_FLAGS"] = flags
    address = f"127.0.0.1:{_free_port()}"
    return [subprocess.Popen([sys.executable, "-c", CHILD, str(num_processes), str(i), address],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(num_processes)]


@pytest.fixture(scope="module")
def runs():
    """The single-process run and the 2-process run, started together; bounded in time."""
    procs = _start(1) + _start(2)
    deadline = time.monotonic() + TIMEOUT_S
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert p.returncode == 0, stderr[-4000:]
            line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))
            outs.append(json.loads(line[len("RESULT "):]))
    finally:
        for p in procs:  # on a failure or timeout, never leave a child waiting for its peer
            if p.poll() is None:
                p.kill()
                p.wait()
    return {"single": outs[0], "multi": outs[1:]}


def test_two_processes_see_each_others_devices(runs):
    for r in runs["multi"]:
        assert r["process_count"] == 2
        assert r["device_count"] == 2
        for backend, run in r["runs"].items():
            assert run["evaluator"] == "ShardedEvaluator", backend
            assert run["num_devices"] == 2, backend
    assert runs["single"]["process_count"] == 1
    assert runs["single"]["runs"]["reference"]["evaluator"] != "ShardedEvaluator"


def test_multi_process_search_equals_single_process(runs):
    single = runs["single"]["runs"]
    assert "reference" in single
    for r in runs["multi"]:
        assert r["runs"].keys() == single.keys()
        for backend, run in r["runs"].items():
            ref = single[backend]
            assert run["masks"] == ref["masks"], backend
            assert len(run["history"]) == len(ref["history"]) == 2, backend
            for h_multi, h_single in zip(run["history"], ref["history"]):
                assert h_multi.keys() == h_single.keys()
                for key, value in h_single.items():
                    np.testing.assert_allclose(np.asarray(h_multi[key], float),
                                               np.asarray(value, float), rtol=0, atol=1e-6,
                                               err_msg=f"{backend} {key}")
    assert runs["multi"][0]["runs"] == runs["multi"][1]["runs"]  # both processes agree


def test_initialize_rejects_half_settings():
    with pytest.raises(MH.MultiHostError, match="all three or none"):
        MH.initialize("127.0.0.1:1234", None, None)
    with pytest.raises(MH.MultiHostError, match="process_id"):
        MH.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(MH.MultiHostError, match="host:port"):
        MH.initialize("localhost", 2, 0)
    with pytest.raises(MH.MultiHostError, match="cpu_collectives"):
        MH.initialize(None, None, None, cpu_collectives="nccl")


def test_command_wrapper_needs_a_command(capsys):
    with pytest.raises(SystemExit):
        MH.main(["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0"])
    assert "give the jaxsplit command after '--'" in capsys.readouterr().err
