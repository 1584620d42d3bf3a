"""Converts a GGUF file or a Hugging Face model directory into an orbax checkpoint.

  ridgeline-convert --input model.gguf --output /ckpt/smollm2
  (or, from a source tree: python scripts/convert_checkpoint.py ...)

The checkpoint holds the weights, the model config and the tokenizer (in
tokenizer/); pass it to the other commands with --checkpoint.
"""

from absl import flags

from ridgeline.cli import _app

flags.DEFINE_string("input", None, ".gguf file or Hugging Face directory.", required=True)
flags.DEFINE_string("output", None, "Orbax checkpoint directory to write.", required=True)
flags.DEFINE_string("dtype", None, "Dtype of the stored weights (default: the source's own; "
                    "quantized GGUF tensors dequantize to float32).")
flags.DEFINE_enum("quantize", None, ["int8", "int4", "fp8"],
                  "Store the projections quantized (model/quant.py), so loads read the small "
                  "weights straight into their shardings.")
flags.DEFINE_bool("force", False, "Replace an existing checkpoint at --output.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from ridgeline.engine.loading import convert
  try:
    convert(FLAGS.input, FLAGS.output, FLAGS.dtype, FLAGS.force, quantize=FLAGS.quantize)
  except FileExistsError as e:  # the library says force=True; here it is a flag
    raise FileExistsError(str(e).replace("pass force=True", "pass --force")) from e
  print(f"wrote {FLAGS.output}")


def run():
  _app.run(main, __name__)


if __name__ == "__main__":
  run()
