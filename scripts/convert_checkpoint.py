"""Converts a GGUF file or a Hugging Face model directory into an orbax checkpoint.

  python scripts/convert_checkpoint.py --input model.gguf --output /ckpt/smollm2
  python scripts/convert_checkpoint.py --input model.gguf --output /ckpt/smollm2-int8 --quantize int8
"""

from absl import app, flags

from model.loading import convert

flags.DEFINE_string("input", None, ".gguf file or Hugging Face directory.", required=True)
flags.DEFINE_string("output", None, "Orbax checkpoint directory to write.", required=True)
flags.DEFINE_string("dtype", "float32", "Dtype of the stored weights.")
flags.DEFINE_bool("force", False, "Replace an existing checkpoint at --output.")
flags.DEFINE_enum("quantize", None, ["int8", "int4", "fp8"],
                  "Store the projections quantized (model/quant.py), so loads read the small "
                  "weights straight into their shardings.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  convert(FLAGS.input, FLAGS.output, FLAGS.dtype, FLAGS.force, quantize=FLAGS.quantize)
  print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
  app.run(main)
