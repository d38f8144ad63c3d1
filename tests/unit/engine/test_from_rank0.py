"""`dist.from_rank0`: what a recipe derives from its data is read by rank 0 alone and reaches
every rank, errors included (issue 30: 64 ranks read the training split 64 times)."""

import json
import multiprocessing as mp

import torch.distributed as tdist

from mmtrain.data.shards import DataError
from mmtrain.engine import dist

WORLD = 2


def _rank(rank, store, log, out, fail):
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)

    def work():
        with open(log, "a") as f:
            f.write(f"{rank}\n")
        if fail:
            raise DataError("sample 000000007 has no 'intent' label")
        return {"labels": ["a", "b"], "read_by": rank}

    try:
        got = {"result": dist.from_rank0(work, "reading the labels")}
    except Exception as e:
        got = {"error": type(e).__name__, "message": str(e)}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(got, f)
    tdist.destroy_process_group()


def run_two_ranks(tmp_path, fail):
    ctx = mp.get_context("fork")
    log, out = tmp_path / "calls", tmp_path / "out"
    procs = [
        ctx.Process(target=_rank, args=(r, tmp_path / "store", log, out, fail))
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    finally:  # a rank left hanging by a failure is not left behind
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    results = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(WORLD)]
    return log.read_text().split(), results


def test_rank0_reads_once_and_every_rank_gets_its_result(tmp_path):
    calls, results = run_two_ranks(tmp_path, fail=False)
    assert calls == ["0"]  # the work ran once, on rank 0
    assert results == [{"result": {"labels": ["a", "b"], "read_by": 0}}] * WORLD


def test_an_error_on_rank0_is_raised_on_every_rank_as_itself(tmp_path):
    calls, results = run_two_ranks(tmp_path, fail=True)
    assert calls == ["0"]
    want = {"error": "DataError", "message": "sample 000000007 has no 'intent' label"}
    assert results == [want] * WORLD
