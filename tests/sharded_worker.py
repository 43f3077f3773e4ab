"""One rank of the sharded-initialisation tests (tests/test_sharded.py runs it in world-size processes).

    python tests/sharded_worker.py RANK WORLD PORT OUT_JSON

Every case builds a model, shards its parameters (hand-made 1-D and 2-D meshes with Shard(0),
Shard(1), Replicate; nn.MultiheadAttention, whose fused in_proj is written in three row blocks; tensor parallel via
parallelize_module; FSDP2 fully_shard of a meta build),
runs ``init_model`` under ``CommDebugMode`` and compares every parameter's ``full_tensor()``
bitwise with the single-process ``init_model`` of the same model and seed. Results go to
OUT_JSON (rank 0 and every rank that finds a mismatch).
"""
from __future__ import annotations

import json
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import initlab
from initlab._engine import CHUNK

SEED = 1234
SCHEMES = [("he_normal", {"distribution": "normal"}), ("xavier_uniform", {}),
           ("lecun_normal", {"distribution": "truncated_normal"})]


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    # 300 -> 501: 150,300 weights (straddles the 131,072-element chunk); 7 and 13: uneven shards
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(300, 501), nn.ReLU(), nn.Linear(501, 7), nn.Tanh(), nn.Linear(7, 13)).to(dtype)


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(6, 10, 3), nn.ReLU(), nn.Conv2d(10, 5, (3, 2)))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(x)).chunk(3, -1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 101, d: int = 36, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class Attention(nn.Module):
    # E = 10: in_proj_weight is 30 x 10, so Shard(0) cuts rows across the q/k/v blocks (2 ranks: 15 + 15;
    # 4 ranks: 8, 8, 8, 6) and Shard(1) leaves uneven columns (4 ranks: 3, 3, 3, 1)
    def __init__(self, e: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn, self.head = nn.MultiheadAttention(e, 2, add_bias_kv=True, batch_first=True), nn.Linear(e, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def shard(model: nn.Module, mesh, placements) -> nn.Module:
    for mod in model.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            pl = [pp if not isinstance(pp, Shard) or pp.dim < p.dim() else Replicate() for pp in placements]
            setattr(mod, pname, nn.Parameter(distribute_tensor(p.detach(), mesh, pl)))
    return model


def compare(case: str, ref: nn.Module, got: nn.Module, comms: int, out: list) -> None:
    bad = []
    ref_params = dict(ref.named_parameters())
    for name, p in got.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        if not torch.equal(full, ref_params[name].detach()):
            bad.append(name)
    same_fp = initlab.fingerprint(got) == initlab.fingerprint(ref)
    out.append({"case": case, "params": len(ref_params), "mismatched": bad, "collectives": comms,
                "fingerprint_equal": same_fp})


def run_init(model: nn.Module, scheme: str, kw: dict) -> int:
    with CommDebugMode() as cm:
        initlab.init_model(model, scheme, generator=torch.Generator().manual_seed(SEED), **kw)
    return cm.get_total_counts()


def reference(build, scheme: str, kw: dict) -> nn.Module:
    ref = build()
    initlab.init_model(ref, scheme, generator=torch.Generator().manual_seed(SEED), **kw)
    return ref


def hand_made(world: int, out: list) -> None:
    meshes = [("1d", init_device_mesh("cpu", (world,)), [[Shard(0)], [Shard(1)], [Replicate()]])]
    if world == 4:
        meshes.append(("2d", init_device_mesh("cpu", (2, 2)),
                       [[Shard(0), Shard(1)], [Shard(1), Shard(0)], [Replicate(), Shard(1)], [Shard(0), Shard(0)]]))
    for mname, mesh, placement_list in meshes:
        for placements in placement_list:
            for scheme, kw in (SCHEMES if mname == "1d" else SCHEMES[-1:]):
                got = shard(mlp(), mesh, placements)
                comms = run_init(got, scheme, kw)
                compare(f"{mname} {placements} mlp {scheme} {kw}", reference(mlp, scheme, kw), got, comms, out)
            got = shard(convnet(), mesh, placements)
            comms = run_init(got, "he_uniform", {})
            compare(f"{mname} {placements} conv he_uniform", reference(convnet, "he_uniform", {}), got, comms, out)
    mesh = meshes[0][1]
    for dtype in (torch.float64, torch.bfloat16):
        got = shard(mlp(dtype), mesh, [Shard(1)])
        kw = {"distribution": "truncated_normal"}
        comms = run_init(got, "he_normal", kw)
        compare(f"1d Shard(1) mlp {dtype} he_normal truncated", reference(lambda d=dtype: mlp(d), "he_normal", kw),
                got, comms, out)


def attention(world: int, out: list) -> None:
    """nn.MultiheadAttention: its fused in_proj_weight is written as three row blocks of the local shard."""
    placement_list = [[Shard(0)], [Shard(1)], [Replicate()]]
    meshes = [("1d", init_device_mesh("cpu", (world,)), placement_list)]
    if world == 4:
        meshes.append(("2d", init_device_mesh("cpu", (2, 2)), [[Shard(0), Shard(1)], [Shard(0), Shard(0)]]))
    for mname, mesh, placements_ in meshes:
        for placements in placements_:
            for scheme, kw in SCHEMES + [("auto", {}), ("torch_default", {})]:
                got = shard(Attention(), mesh, placements)
                comms = run_init(got, scheme, kw)
                compare(f"{mname} {placements} MultiheadAttention {scheme} {kw}", reference(Attention, scheme, kw),
                        got, comms, out)
    with torch.device("meta"):
        got = Attention()
    fully_shard(got, mesh=meshes[0][1])
    got.to_empty(device="cpu")
    comms = run_init(got, "xavier_uniform", {})
    compare("FSDP2 fully_shard MultiheadAttention (meta, to_empty) xavier_uniform",
            reference(Attention, "xavier_uniform", {}), got, comms, out)
    got = shard(Attention(), meshes[0][1], [Shard(0)])
    try:
        initlab.init_model(got, "orthogonal", generator=torch.Generator().manual_seed(SEED))
        msg = "no error"
    except initlab.InitlabError as e:
        msg = str(e)
    ok = "DTensor" in msg and "'attn'" in msg and "\n" not in msg
    out.append({"case": "orthogonal refused on a MultiheadAttention DTensor", "params": 0,
                "mismatched": [] if ok else [msg], "collectives": 0, "fingerprint_equal": True})
    user_functions(meshes[0][1], out)


def _he_with_fans(tensor, fans, generator):
    """A user scheme with a fans= keyword: init_model passes the layer's (global) fans."""
    return initlab.variance_scaling_(tensor, 2.0, "fan_avg", "normal", fans=fans, generator=generator)


def user_functions(mesh, out: list) -> None:
    """A user function on a sharded MultiheadAttention: with fans= it gets the layer's fans (so the
    same values as on one process); without, it is refused before any write (it would see the fans
    of the local block of the shard)."""
    for placements in ([Shard(0)], [Shard(1)]):
        got = shard(Attention(), mesh, placements)
        comms = run_init(got, _he_with_fans, {})
        compare(f"{placements} MultiheadAttention, a user function with fans=", reference(Attention, _he_with_fans, {}),
                got, comms, out)
        got = shard(Attention(), mesh, placements)
        before = {n: p.to_local().clone() for n, p in got.named_parameters()}
        try:
            initlab.init_model(got, torch.nn.init.xavier_normal_, generator=torch.Generator().manual_seed(SEED))
            msg = "no error"
        except initlab.InitlabError as e:
            msg = str(e)
        same = all(torch.equal(p.to_local(), before[n]) for n, p in got.named_parameters())
        ok = "fans=" in msg and "'attn'" in msg and "\n" not in msg and same
        out.append({"case": f"{placements} a user function without fans= refused on a MultiheadAttention DTensor",
                    "params": 0, "mismatched": [] if ok else [msg], "collectives": 0, "fingerprint_equal": True})


def tensor_parallel(world: int, out: list) -> None:
    mesh = init_device_mesh("cpu", (world,))
    got = parallelize_module(mlp(), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    kw = {"distribution": "truncated_normal"}
    comms = run_init(got, "he_normal", kw)
    compare("tensor parallel (colwise, rowwise) he_normal truncated", reference(mlp, "he_normal", kw), got, comms, out)


def fsdp2(world: int, out: list) -> None:
    mesh = init_device_mesh("cpu", (world,))
    with torch.device("meta"):
        got = TinyTransformer()
    for b in got.blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(got, mesh=mesh)
    got.to_empty(device="cpu")
    # to_empty's memory is whatever the allocator gives: make it zeros in one norm on rank 0 and
    # non-zero elsewhere, which once made rank 0 alone keep that norm at zero (zero-init residual)
    rank = torch.distributed.get_rank()
    with torch.no_grad():
        for name, p in got.named_parameters():
            p.to_local().fill_(0.0 if rank == 0 and name.startswith("blocks.1.ln2.") else 7.0)
    kw = {"distribution": "truncated_normal"}
    comms = run_init(got, "he_normal", kw)
    compare("FSDP2 fully_shard tiny transformer (meta, to_empty) he_normal truncated",
            reference(TinyTransformer, "he_normal", kw), got, comms, out)
    # the model still trains: one forward and backward through the sharded parameters
    loss = got(torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(0))).square().mean()
    loss.backward()
    out.append({"case": "FSDP2 forward/backward after init", "params": 0, "mismatched": [] if torch.isfinite(loss)
                else ["loss"], "collectives": 0, "fingerprint_equal": True})


def refused(world: int, out: list) -> None:
    got = shard(mlp(), init_device_mesh("cpu", (world,)), [Shard(0)])
    try:
        initlab.init_model(got, "orthogonal", generator=torch.Generator().manual_seed(SEED))
        msg = "no error"
    except initlab.InitlabError as e:
        msg = str(e)
    ok = "DTensor" in msg and "\n" not in msg
    out.append({"case": "orthogonal refused on DTensor", "params": 0, "mismatched": [] if ok else [msg],
                "collectives": 0, "fingerprint_equal": True})


def main() -> int:
    rank, world, port, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    assert CHUNK < 300 * 501  # the first layer straddles a chunk boundary
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out: list = []
    try:
        for part in (hand_made, attention, tensor_parallel, fsdp2, refused):
            try:
                part(world, out)
            except Exception:  # noqa: BLE001 - reported to the test, which fails on it
                out.append({"case": part.__name__, "error": traceback.format_exc()})
    finally:
        dist.destroy_process_group()
    with open(path, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
