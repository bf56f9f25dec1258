"""The `dinov2-jax` command line: `convert` weights (DINOv2, DINOv3) between formats, and run the feature `demo`."""

from __future__ import annotations

import argparse
import ast
import os
import sys

CONVERT_HELP = """\
Convert DINOv2 and DINOv3 weights. The input kind is detected from its content:
  * Meta hub backbone          dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth
  * Meta DINOv3 backbone       dinov3_vit{s16,s16plus,b16,l16,h16plus,7b16}_pretrain_*.pth
  * Meta teacher checkpoint    {"teacher": {backbone.*, dino_head.*, ibot_head.*}} (chunked blocks ok)
  * Meta linear head           dinov2_vit*14[_reg4]_linear[4]_head.pth
  * transformers state dict    Dinov2 / Dinov2WithRegisters / DINOv3ViT model.safetensors or
                               pytorch_model.bin (DINOv3: the config.json beside it is read too)
  * an earlier export of this tool
The output format comes from the extension: .pth (readable by torch.load(weights_only=True) and
Meta's code with strict=True) or .safetensors. Every conversion goes through the JAX model, so
the file is checked strictly (missing, unexpected and mis-shaped tensors are all reported).
Pickled files are read without executing any code. A DINOv3 backbone written with --layout hf
gets a transformers config.json beside it (unless one is there already).

examples:
  dinov2-jax convert dinov2_vitb14_pretrain.pth vitb14.safetensors
  dinov2-jax convert facebook-dinov2-small/model.safetensors dinov2_vits14.pth
  dinov2-jax convert teacher_checkpoint.pth backbone.pth --backbone-only
  dinov2-jax convert dinov2_vitb14_pretrain.pth dinov2-base-hf --layout hf   # a folder for
      transformers: model.safetensors + config.json, loads with Dinov2Model.from_pretrained("dinov2-base-hf")
  dinov2-jax convert dinov3_vits16_pretrain_lvd1689m-08c60483.pth dinov3-vits16 --layout hf
  dinov2-jax convert dinov3-vits16/model.safetensors dinov3_vits16.pth
"""


def _parse_override(text: str) -> tuple[str, object]:
  key, sep, value = text.partition("=")
  if not sep:
    raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value  # a bare string such as ffn_layer=swiglu


def convert(args: argparse.Namespace) -> int:
  from dinov2_jax import api
  from dinov2_jax.models.dinov3_vit import DINOv3Config
  from dinov2_jax.weights.io import read_weights, write_state_dict

  overrides = dict(args.set or [])
  weights = read_weights(args.input)
  if os.path.abspath(args.input) == os.path.abspath(args.output):
    raise SystemExit("error: output must differ from input")
  if weights.kind == "linear_head":
    write_state_dict(weights.linear_head, args.output)
    print(f"{args.input}: linear head {weights.linear_head['weight'].shape} -> {args.output}")
    return 0
  strict = not args.no_strict
  backbone = api.backbone_from_state_dict(weights.backbone, strict=strict, stored_config=weights.config, **overrides)
  heads = {} if args.backbone_only else {
      name: api.head_from_state_dict(sd, strict=strict) for name, sd in weights.heads.items()}
  cfg = backbone.config
  generation = "DINOv3" if isinstance(cfg, DINOv3Config) else "DINOv2"
  print(f"{args.input}: {weights.kind.replace('_', ' ')}; {generation} backbone embed_dim={cfg.embed_dim} "
        f"depth={cfg.depth} heads={cfg.num_heads} ffn={cfg.ffn_layer} registers={cfg.num_register_tokens} "
        f"img_size={cfg.img_size}" + (f"; heads: {', '.join(heads)}" if heads else ""))
  if args.layout == "hf":
    if heads:
      raise SystemExit("error: --layout hf writes a backbone only; add --backbone-only")
    write_hf(backbone, args.output)
    return 0
  if heads:
    api.save_training_checkpoint(args.output, backbone, heads, block_chunks=args.block_chunks)
  else:
    backbone.save(args.output, block_chunks=args.block_chunks)
  print(f"wrote {args.output}")
  return 0


def write_hf(backbone, output: str) -> None:
  """transformers' layout: the weights plus `config.json`, so `Dinov2Model.from_pretrained(folder)`
  (or `DINOv3ViTModel.from_pretrained` for a DINOv3 backbone) loads it.

  `output` is a folder (gets `model.safetensors`) or a weights file (`config.json` goes beside it;
  from_pretrained looks for the name model.safetensors or pytorch_model.bin).
  """
  import json

  from dinov2_jax.models.dinov3_vit import DINOv3Config
  from dinov2_jax.weights import convert as conv
  from dinov2_jax.weights.convert_dinov3 import hf_dinov3_config
  from dinov2_jax.weights.io import write_state_dict

  # Built before anything is written: refuses what transformers cannot load. transformers needs
  # the head count (and for DINOv3 the RoPE settings), which no tensor holds.
  cfg = backbone.config
  if isinstance(cfg, DINOv3Config):
    config = {"architectures": ["DINOv3ViTModel"], **hf_dinov3_config(cfg)}
  else:
    config = conv.hf_config(cfg)
  folder, weights = (output, os.path.join(output, "model.safetensors")) if not os.path.splitext(output)[1] else (
      os.path.dirname(os.path.abspath(output)), output)
  os.makedirs(folder, exist_ok=True)
  write_state_dict(conv.meta_to_hf(backbone.state_dict()), weights)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  print(f"wrote {weights} and {os.path.join(folder, 'config.json')} ({config['architectures'][0]})")
  if os.path.basename(weights) not in ("model.safetensors", "pytorch_model.bin"):
    print(f"note: transformers' from_pretrained({folder!r}) looks for model.safetensors; rename {weights} or pass "
          "a folder as the output")


def demo(args: argparse.Namespace) -> int:
  from dinov2_jax import demo as demo_lib
  demo_lib.run(args.weights, args.outdir, size=args.size, preset=args.preset)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="dinov2-jax", description="DINOv2 (and DINOv3) in JAX: tools.")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("convert", help="convert weights between Meta, transformers and our formats",
                     description=CONVERT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("input", help="weights file to read (.pth, .bin, .safetensors)")
  p.add_argument("output", help="file to write (.pth or .safetensors), or with --layout hf a folder")
  p.add_argument("--set", metavar="FIELD=VALUE", action="append", type=_parse_override,
                 help="override an inferred backbone field, e.g. --set num_heads=8 --set interpolate_offset=0.0 "
                      "(repeatable)")
  p.add_argument("--backbone-only", action="store_true", help="drop the DINO/iBOT heads of a training checkpoint")
  p.add_argument("--block-chunks", type=int, default=0,
                 help="write block keys as blocks.{chunk}.{i} like Meta's block_chunks=N models (default 0: blocks.{i})")
  p.add_argument("--layout", choices=("meta", "hf"), default="meta",
                 help="key names of the output: Meta's (default) or transformers' (Dinov2 / DINOv3ViT; also "
                      "writes config.json)")
  p.add_argument("--no-strict", action="store_true", help="skip missing/unexpected tensors instead of failing")
  p.set_defaults(func=convert)

  p = sub.add_parser("demo", help="extract features from bundled photos and save a PCA visualisation")
  p.add_argument("--weights", help="backbone weights (e.g. dinov2_vits14_pretrain.pth); default: random init")
  p.add_argument("--preset", default="dinov2_vits14", help="architecture when no weights are given")
  p.add_argument("--size", type=int, default=448, help="input resolution, a multiple of 14 (default 448)")
  p.add_argument("--outdir", default="demo_output", help="where to write pca_features.png and features.npz")
  p.set_defaults(func=demo)
  return parser


def main(argv: list[str] | None = None) -> int:
  from dinov2_jax.weights.torch_format import CheckpointError

  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (CheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
