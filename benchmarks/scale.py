"""Hardware-independent accounting of the compiled DINOv2 train step on a fake 64-device mesh.

    python benchmarks/scale.py                                   # vitl14 and vitg14, 8 data x 8 fsdp, bf16
    python benchmarks/scale.py --models vitg14 --remat-policy full
    python benchmarks/scale.py --models vitl14 --per-device 8 --data 4 --fsdp 16

For each recipe of `dinov2_jax/configs/pretrain.py` (bf16 compute, Meta's per-GPU batch on every device, 2 x 224
+ 8 x 98 crops, drop path 0.4 with Meta's batch subsets, the separate 131072-prototype heads), the
step is lowered on abstract arrays with the trainer's shardings (`dinov2_jax/train/sharding.py`,
every state leaf FSDP-sharded, the batch in per-device data shards, activations pinned by the
default logical axis rules) and compiled by XLA:CPU for `--data` x `--fsdp` fake CPU devices
(`--xla_force_host_platform_device_count`, in a subprocess). Nothing is executed. Reported per
device and per step:

  (a) FLOPs: XLA's cost analysis of the compiled per-device program / the analytic model FLOPs (the
      matmuls of the teacher forward and the student forward + backward, including the padded
      masked-token rows the iBOT heads run on; see `model_flops`). Measured on the unrolled blocks:
      XLA's cost analysis counts the body of a loop once, so it undercounts a scanned step.
  (b) Collective bytes: every all-gather / reduce-scatter / all-reduce / all-to-all /
      collective-permute of the compiled program, as bytes received per device (all-gather and
      reduce-scatter (n-1)/n of the full array, all-reduce 2 (n-1)/n as a ring, n the replica
      group size), loops counted by their known trip counts; over the FSDP minimum: the student
      parameters all-gathered over the fsdp axis for the forward and again for the backward, the
      teacher's for its forward (in the compute dtype), and the float32 gradients reduce-scattered
      over fsdp and all-reduced over data (Meta's FSDP setup: param_dtype fp16 gathers). XLA:CPU
      writes a reduce-scatter as an all-reduce whose result each device slices (twice the bytes);
      the GPU and TPU pipelines turn that pattern into a reduce-scatter (ReduceScatterCreator), so
      a second figure counts those all-reduces as reduce-scatters.
  (c) Parameter + optimizer state bytes per device, from the shardings (exact).
  Also the compile time of the scanned step (`scan_blocks`, as the recipes train) and of the
  unrolled one, and XLA:CPU's memory analysis (which does not model remat's savings on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.machine import print_machine  # noqa: E402

PER_DEVICE = {"vits14": 64, "vitb14": 64, "vitl16_short": 64, "vitl14": 32, "vitg14": 12}  # Meta's per-GPU batch
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}


# ------------------------------------------------------------------------------------------------
# Analytic model FLOPs.


def _block_flops(tokens: int, dim: int, hidden: int, swiglu: bool) -> tuple[float, float]:
  """(attention branch, FFN branch) forward FLOPs of one block for one image of `tokens` tokens."""
  attn = tokens * (2 * dim * 3 * dim + 2 * dim * dim) + 2 * 2 * tokens * tokens * dim  # qkv, proj; QK^T, PV
  ffn = tokens * (2 * dim * 2 * hidden + 2 * hidden * dim) if swiglu else tokens * 2 * 2 * dim * hidden
  return attn, ffn


def _backbone_flops(cfg, images: int, side: int, keep: float) -> float:
  """Forward FLOPs of the backbone on `images` crops of `side` px; `keep` = share of rows the
  residual branches run on (Meta's batch-subset stochastic depth)."""
  grid = (side // cfg.patch_size) ** 2
  tokens = grid + 1 + cfg.num_register_tokens
  attn, ffn = _block_flops(tokens, cfg.embed_dim, cfg.ffn_hidden_dim, cfg.ffn_layer != "mlp")
  patch_embed = grid * 2 * 3 * cfg.patch_size ** 2 * cfg.embed_dim
  return images * (patch_embed + cfg.depth * keep * (attn + ffn))


def _head_flops(head, in_dim: int, rows: int) -> float:
  dims = [in_dim] + [head.hidden_dim] * (head.nlayers - 1) + [head.bottleneck_dim, head.out_dim]
  return rows * sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))


def model_flops(config, arch, per_device: int, masked_rows: int) -> dict[str, float]:
  """Matmul FLOPs of one step on one device's share of the batch (per_device images)."""
  from dinov2_jax.train import state as train_state
  cfg = arch.backbone_config
  c = config.crops
  n_local = c.local_crops_number
  g_rows, l_rows = 2 * per_device, n_local * per_device
  rate = cfg.drop_path_rate

  def subset(rows):  # Meta's drop_add_residual_stochastic_depth keeps max(int(rows * (1 - p)), 1) rows
    return max(int(rows * (1 - rate)), 1) / rows if rate > 0 else 1.0

  dino = train_state._head_config(config.dino)  # pylint: disable=protected-access
  ibot = train_state._head_config(config.ibot if config.ibot.separate_head else config.dino)  # pylint: disable=protected-access
  teacher = (_backbone_flops(cfg, g_rows, c.global_crops_size, 1.0) + _head_flops(dino, cfg.embed_dim, g_rows)
             + _head_flops(ibot, cfg.embed_dim, masked_rows))
  student_fwd = (_backbone_flops(cfg, g_rows, c.global_crops_size, subset(g_rows))
                 + _backbone_flops(cfg, l_rows, c.local_crops_size, subset(l_rows))
                 + _head_flops(dino, cfg.embed_dim, g_rows + l_rows) + _head_flops(ibot, cfg.embed_dim, masked_rows))
  patch_embed = (g_rows * (c.global_crops_size // cfg.patch_size) ** 2
                 + l_rows * (c.local_crops_size // cfg.patch_size) ** 2) * 2 * 3 * cfg.patch_size ** 2 * cfg.embed_dim
  # Backward: twice the forward (input and weight gradients), minus the patch embedding's input
  # gradient (the images are not differentiated).
  student = 3 * student_fwd - patch_embed
  return {"teacher": teacher, "student": student, "total": teacher + student}


# ------------------------------------------------------------------------------------------------
# Collectives in the compiled HLO.


def _shape_bytes(text: str) -> int:
  """Bytes of an HLO shape string such as 'bf16[4,1024]{1,0}' or a tuple of them."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _group_size(line: str, n_devices: int) -> int:
  """Devices per replica group of a collective, from any of XLA's three spellings of the groups."""
  # mesh['a'=2,'b'=4][, device_ids=(...)] {'b'}: the group spans the listed axes.
  m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
  if m:
    sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
    return math.prod(sizes[name] for name in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)  # iota form [groups,size]<=[...]
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([0-9,]+)\}", line)
  if m:
    return len(m.group(1).split(","))
  return n_devices


def collective_bytes(hlo: str, n_devices: int) -> dict[str, float]:
  """{op kind: bytes received per device per step}, loops multiplied by their trip counts."""
  computations: dict[str, list[str]] = {}
  name = None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      name = m.group(1)
      computations[name] = []
      if line.startswith("ENTRY"):
        entry = name
    elif name is not None:
      computations[name].append(line)
  # How many times each computation runs: the entry once; a loop body trip-count times per run of
  # its caller; any other called computation once per run of its caller.
  parents: dict[str, list[tuple[str, int]]] = {}
  for caller, lines in computations.items():
    for line in lines:
      trip = 1
      if " while(" in line:
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        trip = int(m.group(1)) if m else 1
      for attr, callee in re.findall(r"(body|condition|to_apply|calls|branch_computations)=\{?%?([\w.\-]+)", line):
        if callee in computations:
          parents.setdefault(callee, []).append((caller, trip if attr == "body" else 1))
  runs: dict[str, int] = {}

  def count(comp: str) -> int:
    if comp not in runs:
      runs[comp] = 1 if comp == entry else sum(count(p) * f for p, f in parents.get(comp, []))
    return runs[comp]

  # Which values are only ever sliced per device (`dynamic-slice` by partition id, possibly fused,
  # after `get-tuple-element`): an all-reduce of those is a reduce-scatter written out, which the
  # GPU and TPU pipelines (XLA's ReduceScatterCreator) emit as one and XLA:CPU does not.
  users: dict[str, list[str]] = {}
  for lines in computations.values():
    for line in lines:
      m = re.match(r"\s*(%[\w.\-]+) = ", line)
      if m:
        for operand in set(re.findall(r"(%[\w.\-]+)[,)]", line.split("=", 1)[1])):
          users.setdefault(operand, []).append(line)

  def only_sliced(value: str, depth: int = 0) -> bool:
    """True if every use of `value` ends in a per-device slice: a dynamic-slice, or a fusion that
    takes the partition id (the slice offset), possibly after get-tuple-element, dtype conversions,
    or after adding other such values (the gradient contributions of one parameter are summed after
    reduction)."""
    uses = users.get(value, [])
    if not uses or depth > 4:
      return False
    for use in uses:
      result = re.match(r"\s*(%[\w.\-]+) = ", use).group(1)
      opcode_and_name = use.split("(", 1)[0]
      if "dynamic-slice" in opcode_and_name or "%partition-id" in use:
        continue
      passthrough = re.search(r"%(?:wrapped_)?(?:convert|bitcast|copy|add)[\w.\-]*$", result)
      if " get-tuple-element(" in use or passthrough or " add(" in use or " convert(" in use:
        if only_sliced(result, depth + 1):
          continue
      return False
    return True

  def _sliced_bytes(value: str, shape: str) -> int:
    """Bytes of the all-reduce `value` whose results are only sliced per device (per tuple element:
    XLA combines many small all-reduces into one tuple, replicated and sharded leaves mixed)."""
    elements = re.findall(r"\b[a-z]+[0-9]*\[[0-9,]*\]", shape)
    if len(elements) <= 1:
      return _shape_bytes(shape) if only_sliced(value) else 0
    total = 0
    for use in users.get(value, []):
      m = re.match(r"\s*(%[\w.\-]+) = .* get-tuple-element\(.*index=(\d+)", use)
      if m and only_sliced(m.group(1)):
        total += _shape_bytes(elements[int(m.group(2))])
    return total

  out = {kind: 0.0 for kind in COLLECTIVES}
  out["all-reduce sliced per device"] = 0.0
  for comp, lines in computations.items():
    for line in lines:
      for kind in COLLECTIVES:
        if f" {kind}(" in line or f" {kind}-start(" in line:
          shape = line.split("=", 1)[1].split(f" {kind}")[0]
          n = _group_size(line, n_devices)
          size = _shape_bytes(shape)
          if kind == "all-reduce":
            moved = 2 * size * (n - 1) / n
            sliced = _sliced_bytes(re.match(r"\s*(%[\w.\-]+) = ", line).group(1), shape)
            out["all-reduce sliced per device"] += 2 * sliced * (n - 1) / n * count(comp)
          elif kind == "reduce-scatter":
            moved = size * (n - 1)  # the result is 1/n of the reduced array
          else:
            moved = size * (n - 1) / n
          out[kind] += moved * count(comp)
  return out


def as_reduce_scatter(collectives: dict[str, float]) -> float:
  """Total bytes if every all-reduce that is only sliced per device were a reduce-scatter (half the
  bytes of a ring all-reduce), as the GPU/TPU pipelines compile it."""
  return sum(v for k, v in collectives.items() if k in COLLECTIVES) - collectives["all-reduce sliced per device"] / 2


def fsdp_minimum_bytes(student_bytes_f32: int, compute_itemsize: int, data: int, fsdp: int) -> float:
  """Bytes per device per step of the FSDP minimum (see the module docstring)."""
  params = student_bytes_f32 / 4
  gathers = 3 * params * compute_itemsize * (fsdp - 1) / fsdp
  grads = student_bytes_f32 * (fsdp - 1) / fsdp + 2 * (student_bytes_f32 / fsdp) * (data - 1) / data
  return gathers + grads


# ------------------------------------------------------------------------------------------------
# The child process (its device count is fixed when jax is imported).


def child(args) -> None:
  import jax
  import jax.numpy as jnp

  from dinov2_jax import masking, recipes, schedules
  from dinov2_jax.train import sharding
  from dinov2_jax.train import state as train_state
  from dinov2_jax.train import step as train_step

  n_dev = jax.device_count()
  config = recipes.get_config(f"pretrain:{args.model}")
  per_device = args.per_device or PER_DEVICE[args.model]
  config.batch_size = per_device * n_dev
  config.mesh = (("data", args.data), ("fsdp", args.fsdp))
  config.remat_policy = args.remat_policy
  mesh = sharding.mesh_from_config(config)
  bsh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  c = config.crops
  n_tokens = (c.global_crops_size // config.student.patch_size) ** 2
  upper = masking.mask_upperbound(2 * per_device, n_tokens, tuple(config.ibot.mask_ratio_min_max),
                                  config.ibot.mask_sample_probability)
  sds = jax.ShapeDtypeStruct
  batch = dict(
      global_crops=sds((2 * config.batch_size, c.global_crops_size, c.global_crops_size, 3), jnp.uint8, sharding=bsh),
      local_crops=sds((c.local_crops_number * config.batch_size, c.local_crops_size, c.local_crops_size, 3),
                      jnp.uint8, sharding=bsh),
      masks=sds((2 * config.batch_size, n_tokens), jnp.bool_, sharding=bsh),
      mask_indices=sds((n_dev * upper,), jnp.int32, sharding=bsh),
      mask_weights=sds((n_dev * upper,), jnp.float32, sharding=bsh),
      mask_valid=sds((n_dev * upper,), jnp.bool_, sharding=bsh))
  tables = {k: sds(v.shape, v.dtype, sharding=rep) for k, v in schedules.build_schedules(lr=1e-3).tables().items()}

  out = dict(model=args.model, devices=n_dev, mesh=dict(data=args.data, fsdp=args.fsdp), per_device=per_device,
             global_batch=config.batch_size, remat_policy=args.remat_policy, compute_dtype=config.compute_dtype,
             masked_rows_per_device=upper, jax_version=jax.__version__)
  for scan in (False, True):
    config.scan_blocks = scan
    arch = train_state.make_arch(config, drop_path_groups=n_dev)
    student = train_state.abstract_student(config)
    tx = train_step.build_optimizer_for(student, config)
    state = jax.eval_shape(lambda s: train_state.init_train_state(s, tx, config, 0), student)
    state_sh = sharding.tree_shardings(state, mesh, config.sharding_rules, config.fsdp_min_size)
    state_abs = jax.tree.map(lambda x, s: sds(x.shape, x.dtype, sharding=s), state, state_sh)
    constrain = sharding.activation_constraint(mesh, config.logical_axis_rules)
    step = jax.jit(train_step.make_train_step(arch, tx, n_dev, constrain, state_sh.student), donate_argnums=0,
                   out_shardings=(state_sh, rep))
    print(f"compiling {args.model} (scan_blocks={scan}) on {n_dev} devices ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    compiled = step.lower(state_abs, batch, tables).compile()
    key = "scanned" if scan else "unrolled"
    out[f"compile_s_{key}"] = time.perf_counter() - t0
    hlo = compiled.as_text()
    if args.dump_hlo:
      os.makedirs(args.dump_hlo, exist_ok=True)
      with open(os.path.join(args.dump_hlo, f"{args.model}_{key}.hlo.txt"), "w") as f:
        f.write(hlo)
    out[f"collective_bytes_{key}"] = collective_bytes(hlo, n_dev)
    if not scan:
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      out["compiled_flops"] = float(cost["flops"])
      out["model_flops"] = model_flops(config, arch, per_device, upper)
      mem = compiled.memory_analysis()
      out["memory_analysis"] = {f: int(getattr(mem, f)) for f in (
          "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")}

      def shard_bytes(x, s):
        return int(np.prod(s.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize

      out["state_per_device_bytes"] = {k: sum(shard_bytes(x, s) for x, s in zip(
          jax.tree.leaves(getattr(state, k)), jax.tree.leaves(getattr(state_sh, k)))) for k in ("student", "teacher", "opt_state")}
      student_bytes = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(state.student))
      out["n_student_params"] = student_bytes // 4
      out["fsdp_minimum_bytes"] = fsdp_minimum_bytes(student_bytes, jnp.dtype(config.compute_dtype).itemsize,
                                                     args.data, args.fsdp)
  print("SCALE_JSON " + json.dumps(out), flush=True)


def run(args, model: str) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.data * args.fsdp}",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--data", str(args.data),
         "--fsdp", str(args.fsdp), "--remat-policy", args.remat_policy, "--per-device", str(args.per_device),
         "--dump-hlo", args.dump_hlo]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  lines = [l for l in proc.stdout.splitlines() if l.startswith("SCALE_JSON ")]
  if proc.returncode or not lines:
    raise RuntimeError(f"{model}: child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  return json.loads(lines[-1][len("SCALE_JSON "):])


def report(results: list[dict]) -> str:
  gib = 2 ** 30
  rows = ["| recipe | devices (data x fsdp) | batch/device | (a) compiled / model FLOPs | (b) collective bytes / FSDP "
          "minimum: as XLA:CPU compiles it (unrolled, scanned); with reduce-scatters as GPU/TPU compile them | "
          "(c) params + opt state / device | compile s (unrolled, scanned) |",
          "|---|---|---|---|---|---|---|"]
  for r in results:
    flops = r["compiled_flops"] / r["model_flops"]["total"]
    coll = [sum(v for k, v in r[f"collective_bytes_{key}"].items() if k in COLLECTIVES) / r["fsdp_minimum_bytes"]
            for key in ("unrolled", "scanned")]
    rs = [as_reduce_scatter(r[f"collective_bytes_{key}"]) / r["fsdp_minimum_bytes"] for key in ("unrolled", "scanned")]
    state = r["state_per_device_bytes"]
    rows.append(
        f"| {r['model']} ({r['n_student_params'] / 1e9:.2f} B student params, {r['compute_dtype']}, remat "
        f"{r['remat_policy']}) | {r['devices']} ({r['mesh']['data']} x {r['mesh']['fsdp']}) | {r['per_device']} | "
        f"{flops:.3f} ({r['compiled_flops'] / 1e12:.2f} / {r['model_flops']['total'] / 1e12:.2f} TFLOP) | "
        f"{coll[0]:.2f}, {coll[1]:.2f}; **{rs[0]:.2f}, {rs[1]:.2f}** ({coll[0] * r['fsdp_minimum_bytes'] / gib:.2f} / "
        f"{r['fsdp_minimum_bytes'] / gib:.2f} GiB) | "
        f"{(state['student'] + state['teacher'] + state['opt_state']) / gib:.2f} GiB (student "
        f"{state['student'] / gib:.2f}, teacher {state['teacher'] / gib:.2f}, Adam {state['opt_state'] / gib:.2f}) | "
        f"{r['compile_s_unrolled']:.0f}, {r['compile_s_scanned']:.0f} |")
  details = []
  for r in results:
    details.append(f"{r['model']}: collectives (unrolled, GiB/device/step): " + ", ".join(
        f"{k} {v / gib:.3f}" for k, v in r["collective_bytes_unrolled"].items() if v) +
        f"; XLA:CPU memory analysis: temp {r['memory_analysis']['temp_size_in_bytes'] / gib:.1f} GiB, arguments "
        f"{r['memory_analysis']['argument_size_in_bytes'] / gib:.2f} GiB")
  return "\n".join(rows + [""] + details)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="vitl14,vitg14", help="recipes of dinov2_jax/configs/pretrain.py, comma-separated")
  parser.add_argument("--data", type=int, default=8)
  parser.add_argument("--fsdp", type=int, default=8)
  parser.add_argument("--remat-policy", default="none", help="none | full | dots_saveable | ...")
  parser.add_argument("--per-device", type=int, default=0, help="images per device (default: Meta's per-GPU batch)")
  parser.add_argument("--json", help="also write the raw results here")
  parser.add_argument("--dump-hlo", default="", help="write each compiled program's HLO text into this folder")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--model", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
    return
  print_machine()
  print(f"command: python benchmarks/scale.py {' '.join(sys.argv[1:])}", flush=True)
  results = []
  for model in args.models.split(","):
    t0 = time.perf_counter()
    results.append(run(args, model))
    print(f"{model}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
  print(report(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
