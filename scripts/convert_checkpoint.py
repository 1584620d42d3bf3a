"""Converts a GGUF file or a Hugging Face model directory into an orbax checkpoint.

  python scripts/convert_checkpoint.py --input model.gguf --output /ckpt/smollm2
"""

from absl import app, flags

from model.loading import convert

flags.DEFINE_string("input", None, ".gguf file or Hugging Face directory.", required=True)
flags.DEFINE_string("output", None, "Orbax checkpoint directory to write.", required=True)
flags.DEFINE_string("dtype", None, "Dtype of the stored weights (default: the source's own; "
                    "quantized GGUF tensors dequantize to float32).")
flags.DEFINE_bool("force", False, "Replace an existing checkpoint at --output.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  convert(FLAGS.input, FLAGS.output, FLAGS.dtype, FLAGS.force)
  print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
  app.run(main)
