"""Three DINOv2 training iterations: the JAX train step against an independent PyTorch re-statement.

The PyTorch side (`benchmarks/torch_reference_step.py`) re-states Meta's `SSLMetaArch.forward_backward`
and `do_train` iteration for a transformers `Dinov2Model` + torch DINO heads. Both sides start from
the SAME weights (student = teacher, as Meta), see the SAME three batches (random images, iBOT masks
from `sample_batch_masks`) and the SAME schedule values (the float32 tables of
`dinov2_jax.schedules.build_schedules`), and after every step we compare

  * every loss term (dino local/global, koleo, ibot, total) and the per-submodule gradient norms;
  * every student and teacher parameter, element by element, through Meta's key names, and the
    AdamW moments of every student parameter;
  * the DINO / iBOT centres and their pending (lazy) batch centres.

Setup choices:
  * drop_path_rate = 0 (transformers has no batch-subset stochastic depth, and both sides must be
    deterministic); LayerScale on; generic random weights instead of Meta's init (LayerNorm gains
    ~1 +- 0.2, LayerScale gammas ~0.5, visible tokens and pos_embed, non-zero biases, weight-norm
    gains ~1), so that every parameter matters.
  * Global crops (28 px) equal the backbone's img_size: never resampled. Local crops (14 px) are
    resampled with Meta's offset 0.1 on both sides (the torch backbones get Meta's resampling
    patched in; the JAX config keeps its default `interpolate_offset=0.1`).
  * Schedules: lr > 0 from step 0 (no warmup), last-layer lr 0 at step 0 (Meta's freeze) and > 0 at
    steps 1 and 2, weight decay 0.04 -> 0.4 (cosine), teacher momentum 0.9 -> 1 (so the EMA moves
    visibly), teacher temperature 0.04, 0.05, 0.06.

Tolerances (observed errors are printed with `pytest -s`):
  * losses: relative 1e-5 (observed <= ~4e-6); gradient norms: relative 5e-5 (they are taken after
    the parameters went through earlier AdamW steps, see the next point; observed <= ~3e-6).
  * parameters: |jax - torch| <= 1e-5 + 1e-5 |torch| for every element EXCEPT elements whose clipped
    gradient was below 1e-6 (= 100 x AdamW's eps) at some step. For those, AdamW's first update
    `lr * g / (|g| + eps)` turns float32 rounding noise of g into an O(lr) difference in the update
    (a sign flip at worst). The main case is the attention KEY bias, whose exact gradient is 0
    (softmax is invariant to it; both frameworks return ~1e-10 noise); a few other isolated
    elements with |g| ~ 1e-8..1e-7 show the same effect. Such elements must stay within the AdamW
    step bound 2 * sum(lr) and must be rare (the key biases plus < 0.1% of the rest).
  * AdamW moments (exp_avg, exp_avg_sq), i.e. the clipped gradients of every step, element by
    element, including the exempted elements above: max error <= 5e-5 of each tensor's largest
    entry (observed ~1e-5).
  * centres: absolute 1e-6 (raw logits are O(1); observed ~1e-7).
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks.torch_reference_step import HeadSpec, TorchDinov2Step, meta_name_of, meta_param_group  # noqa: E402
from dinov2_jax import masking, optim, param_paths, schedules  # noqa: E402
from dinov2_jax.train import state as train_state  # noqa: E402
from dinov2_jax.train import step as train_step  # noqa: E402
from dinov2_jax.train.default_config import get_default_config  # noqa: E402
from dinov2_jax.weights.convert import flatten_params, hf_to_meta, meta_name, params_to_meta  # noqa: E402

BATCH = 4
GLOBAL, LOCAL, PATCH = 28, 14, 7
N_LOCAL = 2
N_STEPS = 3
HEAD_NLAYERS = 3
DINO_HEAD = HeadSpec(n_prototypes=128, nlayers=HEAD_NLAYERS, hidden_dim=64, bottleneck_dim=32)
IBOT_HEAD = HeadSpec(n_prototypes=96, nlayers=HEAD_NLAYERS, hidden_dim=48, bottleneck_dim=24)

LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 5e-5
PARAM_ATOL = PARAM_RTOL = 1e-5
TINY_GRAD = 1e-6  # 100 x AdamW eps: below this, AdamW's normalised update is noise-dominated
CENTER_ATOL = 1e-6
MOMENT_TOL = 5e-5  # AdamW moments: max abs error / max abs value, per tensor

CASES = {
    "shared_head-centering": dict(separate_head=False, centering="centering"),
    "separate_head-sinkhorn": dict(separate_head=True, centering="sinkhorn_knopp"),
}


def _config(separate_head: bool, centering: str):
  c = get_default_config()
  c.student.update(arch="custom", embed_dim=64, depth=2, num_heads=2, patch_size=PATCH, drop_path_rate=0.0,
                   layerscale=1.0)
  c.crops.update(global_crops_size=GLOBAL, local_crops_size=LOCAL, local_crops_number=N_LOCAL)
  c.dino.update(head_n_prototypes=DINO_HEAD.n_prototypes, head_hidden_dim=DINO_HEAD.hidden_dim,
                head_bottleneck_dim=DINO_HEAD.bottleneck_dim, head_nlayers=HEAD_NLAYERS)
  c.ibot.update(separate_head=separate_head, head_n_prototypes=IBOT_HEAD.n_prototypes,
                head_hidden_dim=IBOT_HEAD.hidden_dim, head_bottleneck_dim=IBOT_HEAD.bottleneck_dim,
                head_nlayers=HEAD_NLAYERS)
  c.centering = centering
  c.batch_size = BATCH
  return c


def _random_params(config, seed: int = 1):
  """Random student weights with the model's tree structure, far from Meta's init (numpy tree).

  Every weight is generic (LayerNorm gains around 1, LayerScale gammas around 0.5, visible tokens
  and positions, non-zero biases, weight-norm gains around 1), so that every parameter matters. The
  values are drawn directly (no jitted init) to keep the test fast; the structure comes from
  `abstract_student` (shapes only).
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = param_paths.path_name(path)
    shape = tuple(leaf.shape)
    noise = rng.normal(size=shape).astype(np.float32)
    if "norm" in name and name.endswith("scale"):
      return 1.0 + 0.2 * noise
    if name.endswith("gamma"):
      return 0.5 + 0.3 * noise
    if name.endswith("last_layer/g"):
      return 1.0 + 0.1 * noise
    if "token" in name or "pos_embed" in name:
      return 0.5 * noise
    if name.endswith(("kernel", "last_layer/v")):
      return noise / np.sqrt(np.prod(shape[:-1]))  # fan-in scaling keeps activations O(1)
    return 0.05 * noise  # biases

  return jax.tree_util.tree_map_with_path(draw, train_state.abstract_student(config))


def _to_meta(params) -> dict[str, dict[str, np.ndarray]]:
  params = jax.device_get(params)
  out = {"backbone": params_to_meta(params["backbone"])}
  for head in ("dino_head", "ibot_head"):
    if head in params:
      out[head] = params_to_meta(params[head], head_nlayers=HEAD_NLAYERS)
  return out


def _adam_moments(opt_state, student_template) -> dict[str, dict]:
  """{"exp_avg": Meta tree, "exp_avg_sq": Meta tree} from the JAX optimizer state.

  The optax state holds one `ScaleByAdamState` per parameter group (multi_transform), each with
  `mu` / `nu` trees where the other groups' leaves are empty `MaskedNode`s; merge them by path.
  """
  adam_states = [x for x in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)) if isinstance(x, optax.ScaleByAdamState)]
  out = {}
  for name, field in (("exp_avg", "mu"), ("exp_avg_sq", "nu")):
    by_path = {}
    for adam in adam_states:
      for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(adam, field))[0]:
        by_path[jax.tree_util.keystr(path)] = leaf
    merged = jax.tree_util.tree_map_with_path(lambda p, x: by_path[jax.tree_util.keystr(p)], student_template)
    out[name] = _to_meta(merged)
  return out


def _schedule_tables():
  # epoch_length=1: one "epoch" per iteration, so the last layer is frozen at step 0 only.
  return schedules.build_schedules(
      lr=1e-3, min_lr=1e-4, epochs=10, warmup_epochs=0, weight_decay=0.04, weight_decay_end=0.4,
      momentum_teacher=0.9, final_momentum_teacher=1.0, teacher_temp=0.07, warmup_teacher_temp=0.04,
      warmup_teacher_temp_epochs=4, freeze_last_layer_epochs=1, epoch_length=1).tables()


def _batches(seed: int = 0):
  rng = np.random.default_rng(seed)
  grid = GLOBAL // PATCH
  out = []
  for _ in range(N_STEPS):
    mb = masking.sample_batch_masks(rng, 2 * BATCH, (grid, grid),
                                    max_num_patches=masking.meta_max_num_patches(GLOBAL, PATCH))
    out.append(dict(
        global_crops=rng.normal(size=(2 * BATCH, GLOBAL, GLOBAL, 3)).astype(np.float32),
        local_crops=rng.normal(size=(N_LOCAL * BATCH, LOCAL, LOCAL, 3)).astype(np.float32),
        masks=mb.masks, mask_indices=mb.mask_indices, mask_weights=mb.mask_weights, mask_valid=mb.mask_valid))
  return out


def _run(separate_head: bool, centering: str):
  """Runs both implementations side by side; returns per-step records of both."""
  config = _config(separate_head, centering)
  arch = train_state.make_arch(config)
  student = jax.tree.map(jnp.asarray, _random_params(config))
  tx = train_step.build_optimizer_for(student, config)
  state = train_state.init_train_state(student, tx, config, 0)
  tables = _schedule_tables()

  reference = TorchDinov2Step(
      embed_dim=64, depth=2, num_heads=2, patch_size=PATCH, img_size=GLOBAL, n_local_crops=N_LOCAL,
      dino_head=DINO_HEAD, ibot_head=IBOT_HEAD if separate_head else None, centering=centering,
      schedules=tables, layerscale=1.0, interpolate_offset=config.student.interpolate_offset,
      attn_implementation="eager")
  reference.load_meta_state_dicts(_to_meta(student), which="both")

  step_fn = jax.jit(train_step.make_train_step(arch, tx), donate_argnums=0)
  records = []
  for it, batch in enumerate(_batches()):
    state, metrics = step_fn(state, batch, tables)
    torch_metrics = reference.step(batch, it)
    records.append(dict(
        jax_metrics={k: float(v) for k, v in jax.device_get(metrics).items()},
        torch_metrics=torch_metrics,
        jax_student=_to_meta(state.student), jax_teacher=_to_meta(state.teacher),
        torch_student=reference.meta_state_dicts("student"), torch_teacher=reference.meta_state_dicts("teacher"),
        torch_grads=reference.meta_state_dicts("grads"),
        jax_moments=_adam_moments(state.opt_state, state.student),
        torch_moments={k: reference.meta_state_dicts(k) for k in ("exp_avg", "exp_avg_sq")},
        jax_centers={f"{n}_{f}": np.asarray(getattr(getattr(state, f"{n}_center"), f))
                     for n in ("dino", "ibot") for f in ("center", "pending")},
        torch_centers=reference.centers(),
        lr=float(tables["lr"][it]), last_layer_lr=float(tables["last_layer_lr"][it])))
  return records


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
  return request.param, _run(**CASES[request.param])


def _compare_params(jax_tree, torch_tree, tiny, bound, what):
  """Element-wise comparison of two Meta-keyed trees.

  Returns (max abs error over elements whose gradient was never tiny, max abs error over the
  tiny-gradient elements, number of elements outside the normal tolerance).
  """
  worst_regular, worst_tiny, n_over = 0.0, 0.0, 0
  for module in torch_tree:
    assert set(jax_tree[module]) == set(torch_tree[module]), module
    for key, ref in torch_tree[module].items():
      ours = jax_tree[module][key]
      assert ours.shape == ref.shape, (what, module, key)
      err = np.abs(ours.astype(np.float64) - ref)
      small = tiny[module][key]
      over = err > PARAM_ATOL + PARAM_RTOL * np.abs(ref)
      unexplained = over & ~small
      assert not unexplained.any(), (
          f"{what} {module}.{key}: {int(unexplained.sum())} elements differ by up to "
          f"{err[unexplained].max():.3g} although their gradient was not tiny")
      assert (err[over] <= bound).all(), (
          f"{what} {module}.{key}: tiny-gradient element off by {err[over].max():.3g} > AdamW bound {bound:.3g}")
      n_over += int(over.sum())
      if (~small).any():
        worst_regular = max(worst_regular, float(err[~small].max()))
      if small.any():
        worst_tiny = max(worst_tiny, float(err[small].max()))
  return worst_regular, worst_tiny, n_over


def test_losses_params_and_centres_match(case):
  name, records = case
  tiny = None
  lr_sum = 0.0
  print(f"\n[{name}]")
  for it, r in enumerate(records):
    # Losses and gradient norms.
    errors = {}
    for key, ref in r["torch_metrics"].items():
      ours = r["jax_metrics"][key]
      rel = abs(ours - ref) / max(abs(ref), 1e-12)
      errors[key] = rel
      rtol = GRAD_NORM_RTOL if key.startswith("grad_norm/") else LOSS_RTOL
      assert rel <= rtol, f"step {it} {key}: jax {ours:.8g} vs torch {ref:.8g} (rel {rel:.2e})"

    # Parameters: elements with a tiny gradient at any step so far may carry AdamW-amplified noise.
    step_tiny = {m: {k: np.abs(g) < TINY_GRAD for k, g in grads.items()} for m, grads in r["torch_grads"].items()}
    tiny = step_tiny if tiny is None else {
        m: {k: tiny[m][k] | step_tiny[m][k] for k in step_tiny[m]} for m in step_tiny}
    lr_sum += max(r["lr"], r["last_layer_lr"])
    bound = 2.0 * lr_sum
    student_err, student_tiny_err, student_out = _compare_params(
        r["jax_student"], r["torch_student"], tiny, bound, f"step {it} student")
    teacher_err, teacher_tiny_err, teacher_out = _compare_params(
        r["jax_teacher"], r["torch_teacher"], tiny, bound, f"step {it} teacher")
    key_bias = sum(int(tiny["backbone"][k][64:128].sum()) for k in tiny["backbone"] if k.endswith("attn.qkv.bias"))
    n_elements = sum(v.size for m in r["torch_student"].values() for v in m.values())
    assert student_out <= key_bias + 1e-3 * n_elements, (
        f"step {it}: {student_out} tiny-gradient outliers, more than the key biases + 0.1%")

    # AdamW moments = running averages of the clipped gradients: this compares the gradients
    # themselves, including the tiny-gradient elements exempted above (a real gradient error there
    # would show here). Scaled by each tensor's largest entry, since relative errors of entries that
    # are ~0 by cancellation are meaningless.
    moment_err = 0.0
    for kind in ("exp_avg", "exp_avg_sq"):
      for module, tensors in r["torch_moments"][kind].items():
        for key, ref in tensors.items():
          err = float(np.abs(r["jax_moments"][kind][module][key] - ref).max() / max(np.abs(ref).max(), 1e-30))
          assert err <= MOMENT_TOL, f"step {it} AdamW {kind} {module}.{key}: max error {err:.2e} of the tensor's max"
          moment_err = max(moment_err, err)

    # Centres (zero on both sides for Sinkhorn-Knopp).
    center_err = {}
    for key, ref in r["torch_centers"].items():
      center_err[key] = float(np.abs(r["jax_centers"][key] - ref).max())
      assert center_err[key] <= CENTER_ATOL, f"step {it} {key}: max abs error {center_err[key]:.3g}"

    print(f"step {it}: loss/grad-norm rel err max {max(errors.values()):.2e} "
          f"({', '.join(f'{k} {v:.1e}' for k, v in errors.items())})")
    n_tiny = sum(int(v.sum()) for m in tiny.values() for v in m.values())
    print(f"        params max abs err: student {student_err:.2e}, teacher {teacher_err:.2e}; "
          f"{n_tiny} tiny-gradient elements ({key_bias} key-bias): max err student {student_tiny_err:.2e}, "
          f"teacher {teacher_tiny_err:.2e}, {student_out}/{teacher_out} beyond 1e-5 (AdamW bound {bound:.1e}); "
          f"AdamW moments max err {moment_err:.1e} (of tensor max); centres max {max(center_err.values()):.2e}")


def test_param_groups_agree_with_jax_rules():
  """The torch step's Meta-name groups equal the JAX optimizer's groups, parameter by parameter."""
  config = _config(separate_head=True, centering="centering")
  student = train_state.abstract_student(config)
  jax_groups = optim.param_groups(student, layerwise_decay=0.9, patch_embed_lr_mult=0.2)
  reference = TorchDinov2Step(
      embed_dim=64, depth=2, num_heads=2, patch_size=PATCH, img_size=GLOBAL, n_local_crops=N_LOCAL,
      dino_head=DINO_HEAD, ibot_head=IBOT_HEAD, layerscale=1.0)
  torch_groups = {}
  for group in reference.optimizer.param_groups:
    for name in group["names"]:
      torch_groups[name] = (group["lr_multiplier"], group["wd_multiplier"], group["is_last_layer"])
  flat = {}
  for module in student:
    nlayers = None if module == "backbone" else HEAD_NLAYERS
    for path in flatten_params(student[module]):
      flat[f"{module}.{meta_name(path, nlayers)}"] = jax_groups["/".join([module] + [str(p) for p in path])]
  assert set(flat) == set(torch_groups)
  for name, group in flat.items():
    assert torch_groups[name] == pytest.approx(tuple(group), rel=1e-12), name
  # Spot checks of Meta's rules (depth 2: blocks.0 -> 0.9^2, final norm -> 1).
  assert meta_param_group("blocks.0.attn.qkv.weight", 2, 0.9, 0.2) == dict(
      lr_multiplier=pytest.approx(0.81), wd_multiplier=1.0, is_last_layer=False)
  assert meta_param_group("patch_embed.proj.weight", 2, 0.9, 0.2)["lr_multiplier"] == pytest.approx(0.9 ** 3 * 0.2)
  assert meta_param_group("last_layer.weight_g", 0, 0.9, 0.2) == dict(
      lr_multiplier=1.0, wd_multiplier=1.0, is_last_layer=True)


def test_name_map_matches_converter():
  """`meta_name_of` (torch step) and `hf_to_meta` (weights converter) name the same Meta keys."""
  reference = TorchDinov2Step(embed_dim=64, depth=2, num_heads=2, patch_size=PATCH, img_size=GLOBAL,
                              n_local_crops=N_LOCAL, dino_head=DINO_HEAD, layerscale=1.0)
  backbone = reference.student["backbone"]
  hf = {k: v.detach().numpy() for k, v in backbone.state_dict().items()}
  assert {meta_name_of(n) for n, _ in backbone.named_parameters()} == set(hf_to_meta(hf))
  ours = reference.meta_state_dicts("student")["backbone"]
  converted = hf_to_meta(hf)
  for key, value in converted.items():
    np.testing.assert_array_equal(ours[key], value, err_msg=key)
