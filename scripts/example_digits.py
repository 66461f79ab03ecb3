"""Write the README's example pictures for ``lenet_xp.predict`` from your MNIST copy:

    LENET_XP_DATA=../shared/datasets/mnist python scripts/example_digits.py [digits]

- ``seven.png``, ``three.png``: MNIST test digits 0 and 18, saved as they are (white on
  black, 28x28);
- ``four.jpg``: test digit 115 as if drawn with a dark pen on white paper, 4x larger
  (112x112) and off-centre on a 160x160 page, saved as a JPEG;
- ``notes.png``: a text file with a picture's name (predict must refuse it in one line).
"""

import argparse
from pathlib import Path

from PIL import Image, ImageOps

from lenet_xp.data.mnist import load_mnist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", nargs="?", default="digits")
    args = p.parse_args()
    out = Path(args.folder)
    out.mkdir(parents=True, exist_ok=True)
    test = load_mnist(None, download=False).test_images
    Image.fromarray(test[0]).save(out / "seven.png")
    Image.fromarray(test[18]).save(out / "three.png")
    four = ImageOps.invert(Image.fromarray(test[115])).resize((112, 112), Image.BILINEAR)
    page = Image.new("L", (160, 160), 255)
    page.paste(four, (40, 8))  # right of centre and near the top
    page.save(out / "four.jpg", quality=90)
    (out / "notes.png").write_text("shopping: milk, eggs\n")
    for name in ("seven.png", "three.png", "four.jpg", "notes.png"):
        print(out / name)


if __name__ == "__main__":
    main()
