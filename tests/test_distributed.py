"""Several training processes (SPEC §7): the helpers, and a real 2-process gloo run on CPU.

The 2-process test launches this very file under ``python -m torch.distributed.run`` (the
code under ``__main__``): each rank runs the `train` stage as torchrun would, then an
interrupted run and its resumption, records what it saw and dumps it; the test compares the
ranks' dumps.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from seco_cli import distributed
from seco_cli.device import resolve_device
from seco_cli.errors import SecoError
from seco_cli.memory import CamHeads, Prototypes
from seco_cli.trainer import Schedules, check_reservoir_capacity
from tests.conftest import ROOT, tiny_params

# TINY: 4 images × (4 patches + 2 global views) = 24 keys per rank and step; L_iL from
# iteration 2 → 4 steps × 2 ranks × 24 = 192 keys, exactly one full reservoir
# cam_select agreement: the tile forward and the per-class statistics gathered over the ranks
RUN = ("train.preset=seco", "train.reservoir_capacity=192", "train.cam_select=agreement")
KEYS_PER_RANK = 24
TERMS = ("cls", "aux", "seg", "reg", "ptc", "lig", "lil")


def test_helpers_are_the_identity_in_a_one_process_group(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        x, tags = torch.randn(3, 4), torch.tensor([1, -1, 0])
        gx, gtags = distributed.gather_cat(x, tags)
        assert gx is x and gtags is tags
        assert distributed.world_size() == 1 and distributed.rank() == 0
        assert distributed.is_main_process()
        assert distributed.mean_over_ranks({"a": 1.5, "b": -2.0}) == {"a": 1.5, "b": -2.0}
        assert distributed.any_rank(True) and not distributed.any_rank(False)
        distributed.barrier()
        with distributed.session("cpu", "train.device") as device:  # the caller's group is used
            assert device == torch.device("cpu")
        assert dist.is_initialized()  # ... and left open
    finally:
        dist.destroy_process_group()


def test_rank_shards_split_each_global_batch_disjointly():
    class Positions:
        def __len__(self) -> int:
            return 2**62

        def __getitem__(self, g: int) -> int:
            return g

    shards = [distributed.RankShard(Positions(), r, 2, 3) for r in range(2)]
    got = [[shard[p] for p in range(6)] for shard in shards]  # two iterations of 3 per rank
    assert got == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]]


def test_reservoir_capacity_must_hold_whole_steps_of_every_rank():
    tp = tiny_params("train.preset=seco").train  # capacity 48 = 4 × (4 + 2) × 2
    check_reservoir_capacity(tp, Schedules.build(tp), 1)
    check_reservoir_capacity(tp, Schedules.build(tp), 2)
    with pytest.raises(SecoError, match=r"× 4 = 96 at train.reservoir_capacity"):
        check_reservoir_capacity(tp, Schedules.build(tp), 4)
    baseline = tiny_params("train.preset=baseline").train  # no L_iL: the reservoir is unused
    check_reservoir_capacity(baseline, Schedules.build(baseline), 4)


def test_each_process_takes_its_local_gpu_or_the_cpu():
    assert resolve_device("cpu", "train.device", local_rank=1) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto", "train.device", local_rank=1) == torch.device("cpu")
        return
    assert resolve_device("cuda", "train.device", local_rank=0) == torch.device("cuda", 0)
    with pytest.raises(SecoError, match="names one GPU"):
        resolve_device("cuda:0", "train.device", local_rank=0)


def test_cpu_trains_in_float32_and_a_checkpoint_resumes_only_its_world_size(
        tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch):
    from seco_cli.data.prepared import PreparedDataset
    from seco_cli.trainer import Trainer, train

    p = tiny_params("train.preset=seco", "train.iterations=1")
    data = PreparedDataset(prepared)
    meta = {"params": p.dump()}
    dtypes = []
    real_init = Trainer.__init__

    def init(self, *args):
        real_init(self, *args)
        linear = next(m for m in self.net.modules() if isinstance(m, torch.nn.Linear))
        linear.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))  # autocast op

    monkeypatch.setattr(Trainer, "__init__", init)
    trainer = train(p, data, torch.device("cpu"), meta, tmp_path, False, lambda *_: None)
    assert not trainer.autocast and dtypes and set(dtypes) == {torch.float32}  # bf16: CUDA only
    state = {**trainer.state(), "world_size": 2}
    with pytest.raises(SecoError, match="made by 2 process"):
        trainer.load_state(state)


def test_two_process_gloo_training(tmp_path: Path, prepared: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(prepared), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))

    # finite losses for every term, logged once (rank 0) as the mean over the ranks
    assert r1["result"] == {} and r1["lives"] == 0 and r0["lives"] == 1
    for term in TERMS:
        assert math.isfinite(r0["result"][f"loss/{term}"]), term
    for r in (r0, r1):
        assert all(math.isfinite(v) for logged in r["logged"].values() for v in logged.values())
    for name in ("loss/total", "loss/lil", "seco/tag_class", "seco/reservoir_fill"):
        per_rank = [sum(r["logged"][it][name] for it in (4, 5)) / 2 for r in (r0, r1)]
        assert r0["result"][name] == pytest.approx(sum(per_rank) / 2, rel=1e-9), name

    # disjoint data: rank r takes global slots r·4 … r·4 + 3 of each 8-sample global batch
    for rank, r in enumerate((r0, r1)):
        for it, index in r["index"].items():
            assert index == [it * 8 + rank * 4 + s for s in range(4)]

    # student, teacher, reservoir and prototypes identical on both ranks
    assert r0["state"].keys() == r1["state"].keys()
    for name, a in r0["state"].items():
        assert torch.equal(a, r1["state"][name]), name

    # the reservoir holds both ranks' keys and tags, rank 0's then rank 1's, step by step
    state = r0["state"]
    assert int(state["reservoir.filled"]) == 4 * 2 * KEYS_PER_RANK  # one rank: 4 × 24
    enq = [r["gathers"]["enqueue"] for r in (r0, r1)]
    assert len(enq[0]) == len(enq[1]) == 4
    assert not torch.equal(enq[0][0][0], enq[1][0][0])  # the ranks saw different patches
    keys = torch.cat([enq[r][s][0] for s in range(4) for r in (0, 1)])  # (192, d)
    tags = torch.cat([enq[r][s][1] for s in range(4) for r in (0, 1)])
    assert torch.equal(state["reservoir.keys"], keys)
    assert torch.equal(state["reservoir.tags"], tags)

    # prototypes = the sequential update over both ranks' class tokens and labels
    p = tiny_params(*RUN)
    protos = Prototypes(state["prototypes.P"].shape[0], state["prototypes.P"].shape[1],
                        seed=p.train.seed)
    assert not torch.allclose(protos.P, state["prototypes.P"])
    proto = [r["gathers"]["prototypes"] for r in (r0, r1)]
    for s in range(len(proto[0])):
        protos.update(torch.cat([proto[0][s][0], proto[1][s][0]]),
                      torch.cat([proto[0][s][1], proto[1][s][1]]), p.train.proto_momentum,
                      p.train.prototype_update, p.train.tau_g)
    assert torch.allclose(protos.P, state["prototypes.P"], atol=1e-6)

    # the per-class CAM head statistics = the update over both ranks' agreements, step by step
    heads = CamHeads(state["cam_heads.agreement"].shape[1], "agreement")
    got = [r["gathers"]["heads"] for r in (r0, r1)]
    assert len(got[0]) == len(got[1]) > 0
    for s in range(len(got[0])):
        heads.update(torch.cat([got[0][s][0], got[1][s][0]]),
                     torch.cat([got[0][s][1], got[1][s][1]]), p.train.cam_select_momentum)
    assert torch.equal(heads.seen, state["cam_heads.seen"])
    assert torch.allclose(heads.agreement, state["cam_heads.agreement"], atol=1e-6)
    assert heads.agreement.abs().sum() > 0

    # parameters no term used keep grad None under DDP (AdamW skips them, as in one process)
    assert r0["none_grads"] == r1["none_grads"]
    assert any(n.startswith("net.decoder.") for n in r0["none_grads"])  # seg starts at 3
    assert any(n.startswith("proj.") for n in r0["none_grads"])  # contrasts start at 2
    assert not any(n.startswith("net.classifier.") for n in r0["none_grads"])

    # rank 0 alone wrote the checkpoints and the model
    assert r1["saves"] == r1["resume_saves"] == []
    assert r0["resume_saves"] == [str(tmp_path / "b" / "last.pt")] * 2  # iterations 3 and 6
    ckpt = tmp_path / "ckpt" / "last.pt"
    assert r0["saves"] == [str(ckpt), str(ckpt), str(tmp_path / "model.pt")]
    last = torch.load(ckpt, weights_only=True)
    assert last["iteration"] == 6 and last["world_size"] == 2
    for name, a in last["method"].items():
        assert torch.equal(a, state[name]), name

    # an interrupted 2-process run, resumed, equals the uninterrupted one on both ranks
    assert r0["resume_mismatch"] == r1["resume_mismatch"] == []


# ------------------------------------------------------------------ the worker (torchrun)
def _worker(prepared: Path, out: Path) -> None:
    """One rank: the train stage as torchrun runs it, then interrupt + resume; dumps records."""
    import dvclive

    import seco_cli.method as method_mod
    import seco_cli.trainer as trainer_mod
    import stages.train as stage
    from seco_cli.data.prepared import PreparedDataset

    p = tiny_params(*RUN)
    rec: dict = {"saves": [], "gathers": {"enqueue": [], "prototypes": [], "heads": []},
                 "logged": {},
                 "index": {}, "none_grads": [], "lives": 0}

    def recording(real):
        def save(obj, path):
            rec["saves"].append(str(path))
            real(obj, path)
        return save

    trainer_mod.save_atomic = recording(trainer_mod.save_atomic)
    stage.save_atomic = recording(stage.save_atomic)
    real_gather = method_mod.gather_cat

    def gather(*tensors):
        # (keys, tags) | (CAM head agreements (B, 2, C), counted) | (z, labels)
        kind = ("enqueue" if tensors[1].ndim == 1 else
                "heads" if tensors[0].ndim == 3 else "prototypes")
        rec["gathers"][kind].append([t.detach().clone() for t in tensors])
        return real_gather(*tensors)

    method_mod.gather_cat = gather
    real_step = trainer_mod.Trainer.step

    def step(self, batch, it):
        logged = real_step(self, batch, it)
        rec["logged"][it], rec["index"][it] = logged, batch["index"].tolist()
        if it == 0:
            rec["none_grads"] = sorted(n for n, q in self.method.named_parameters()
                                       if q.requires_grad and q.grad is None)
        return logged

    trainer_mod.Trainer.step = step
    real_live = dvclive.Live

    class CountedLive(real_live):
        def __init__(self, *args, **kwargs):
            rec["lives"] += 1
            super().__init__(*args, **kwargs)

    dvclive.Live = CountedLive
    trainers: list = []
    real_train = stage.train
    stage.train = lambda *a, **k: trainers.append(real_train(*a, **k)) or trainers[-1]

    # 1. the stage, joining the process group from torchrun's environment
    rec["result"] = stage.run(p, prepared, out / "model.pt", out / "live", out / "ckpt")
    full = trainers[0].method.state_dict()
    rank = trainers[0].rank

    # 2. both ranks "die" at iteration 4, after the checkpoint of iteration 3; then resume
    data = PreparedDataset(prepared)
    meta = {"backbone": p.model.backbone, "num_classes": data.num_classes, "params": p.dump()}
    dump = {**rec, "saves": list(rec["saves"]), "logged": dict(rec["logged"]),
            "index": dict(rec["index"]), "state": full,
            "gathers": {kind: list(calls) for kind, calls in rec["gathers"].items()}}
    rec["saves"].clear()

    def dying(self, batch, it):
        if it == 4:
            raise KeyboardInterrupt
        return step(self, batch, it)

    # a second group in the same processes: torchrun's store still holds the first group's
    # rendezvous keys (gloo hangs on them), so this one meets over a fresh file store
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}",
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    with distributed.session("cpu", "train.device") as device:  # uses the group above
        trainer_mod.Trainer.step = dying
        try:
            trainer_mod.train(p, data, device, meta, out / "b", False, lambda *_: None)
        except KeyboardInterrupt:
            pass
        trainer_mod.Trainer.step = step
        resumed = trainer_mod.train(p, data, device, meta, out / "b", True, lambda *_: None)
    dist.destroy_process_group()
    state = resumed.method.state_dict()
    dump["resume_mismatch"] = [k for k, v in full.items() if not torch.equal(v, state[k])]
    if resumed.iteration != 6:
        dump["resume_mismatch"].append(f"iteration {resumed.iteration}")
    dump["resume_saves"] = rec["saves"]
    torch.save(dump, out / f"rank{rank}.pt")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
