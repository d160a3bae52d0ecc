"""Convert a Hugging Face SwitchTransformers checkpoint into a moe_jax checkpoint + model.gin.

  python scripts/convert_checkpoint.py --input=switch-base-8 --output=checkpoints/switch_base_8

then fine-tune from it:

  python scripts/train.py --gin_file=checkpoints/switch_base_8/model.gin \
      --gin_file=runs/finetune.gin \
      --gin.INITIAL_CHECKPOINT_PATH="'checkpoints/switch_base_8'" --gin.MODEL_DIR="'runs/ft'"
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax.convert import convert_checkpoint  # noqa: E402


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", required=True,
                      help="transformers checkpoint directory (config.json + weights)")
  parser.add_argument("--output", required=True, help="directory to write (must be empty)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the contents of a non-empty --output")
  args = parser.parse_args(argv)
  try:
    report = convert_checkpoint(args.input, args.output, overwrite=args.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
    parser.exit(2, f"convert_checkpoint.py: error: {e}\n")
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main(sys.argv[1:])
