"""Print the paths of a few sample photographs shipped with scikit-image, for the offline demo."""

from __future__ import annotations

from pathlib import Path

SAMPLES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")


def sample_image_paths() -> list[Path]:
    """Paths of the bundled sample images that exist in the installed scikit-image."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return [folder / name for name in SAMPLES if (folder / name).is_file()]


def main() -> None:
    print(" ".join(str(path) for path in sample_image_paths()))


if __name__ == "__main__":
    main()
