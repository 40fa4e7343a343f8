"""Regenerate the pictures of "Inside the network" (docs/insight.md): transferlab's beside the lesson's.

Runs the three lesson presets with the offline EfficientNet-Lite0 (ideal cat, ideal zebra, the dog attacked
into a Siamese cat), measures the lesson's published pictures in ../shared/data/seed-images with the same
yardsticks (total variation; Lite0's and the held-out Lite1's probability for the class), and writes:
  <out>/ideal_cat.png, ideal_zebra.png, adversarial_dog_difference.png   transferlab's pictures (committed)
  <out>/comparison.md                                                     the measurements (committed)
  <out>/side_by_side/*.png   lesson | transferlab figures (git-ignored: the lesson's images are not ours)

    python scripts/lesson_comparison.py [--shared ../shared] [--out docs/lesson] [--steps 512]
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from transferlab.core.plotting import pyplot, save_figure
from transferlab.insight.pixels import PixelClassifier, second_opinion, to_pixels, total_variation

REPO = Path(__file__).resolve().parents[1]
IDEAL = {"ideal_cat": ("ideal-cat.png", "Siamese cat"), "ideal_zebra": ("ideal-zebra.png", "zebra")}


def run(module: str, run_dir: Path, *overrides: str) -> dict:
    """transferlab-<module> in this process (the same validated command as the CLI); its result.json."""
    importlib.import_module(f"transferlab.cli.{module}").command.run_in_process(overrides, run_dir)
    return json.loads((run_dir / "result.json").read_text())


def judge(models: dict[str, PixelClassifier], image: Image.Image, target: str) -> dict[str, float]:
    """Each model's probability for `target`, the image resized to the model's input (bicubic)."""
    out = {}
    for name, model in models.items():
        pixels = to_pixels(image.convert("RGB").resize((model.input_size,) * 2, Image.Resampling.BICUBIC))
        out[name] = float(model.probabilities(pixels[None])[0, model.resolve_target(target)])
    return out


def side_by_side(path: Path, panels: list[tuple[Path, str]]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (file, title) in zip(axes, panels):
        with Image.open(file) as img:
            ax.imshow(img.convert("RGB"))
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    save_figure(fig, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "lesson")
    parser.add_argument("--steps", type=int, default=None, help="optimisation steps for the ideal images (default: the presets')")
    args = parser.parse_args()
    seeds = args.shared / "data" / "seed-images"
    models = {"Lite0": second_opinion("tf_efficientnet_lite0"), "Lite1": second_opinion("tf_efficientnet_lite1")}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = ["| picture | source | p(target) Lite0 | p(target) Lite1 (held out) | total variation | notes |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, (lesson_file, target) in IDEAL.items():
            extra = [f"steps={args.steps}"] if args.steps else []
            ours = run("visualize", Path(tmp) / name, f"experiment=lesson/{name}", *extra)
            shutil.copy(Path(tmp) / name / "ideal.png", args.out / f"{name}.png")
            with Image.open(seeds / lesson_file) as img:
                theirs = judge(models, img, target)
                tv = float(total_variation(to_pixels(img)))
            rows.append(f"| ideal {target} | lesson (VGG-16) | {theirs['Lite0']:.3f} | {theirs['Lite1']:.3f} | {tv:.3f} | |")
            rows.append(
                f"| ideal {target} | transferlab (Lite0) | {ours['target_prob']:.3f} | {ours['heldout_prob']:.3f} | "
                f"{ours['total_variation']:.3f} | {ours['steps']} steps, {ours['seconds']:.0f} s CPU |"
            )
            side_by_side(
                args.out / "side_by_side" / f"{name}.png",
                [
                    (seeds / lesson_file, f"lesson: Lite0 {theirs['Lite0']:.3f}, Lite1 {theirs['Lite1']:.3f}, TV {tv:.3f}"),
                    (
                        args.out / f"{name}.png",
                        f"transferlab: Lite0 {ours['target_prob']:.3f}, Lite1 {ours['heldout_prob']:.3f}, TV {ours['total_variation']:.3f}",
                    ),
                ],
            )

        attack_dir = Path(tmp) / "adversarial_dog"
        ours = run("attack", attack_dir, "experiment=lesson/adversarial_dog", f"input={seeds / 'dog-from-unsplash.jpg'}")
        shutil.copy(attack_dir / "difference.png", args.out / "adversarial_dog_difference.png")
        with Image.open(seeds / "adversarial-dog.png") as adv, Image.open(seeds / "original-dog.png") as orig:
            theirs = judge(models, adv, "Siamese cat")
            a, o = (to_pixels(i.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)) for i in (adv, orig))
            change = float((a - o).abs().mean() * 255)
        rows.append(
            f"| dog -> Siamese cat | lesson (VGG-16, unbounded) | {theirs['Lite0']:.3f} | {theirs['Lite1']:.3f} | | "
            f"mean change ≈ {change:.1f}/255 per pixel (files differ in size; approximate) |"
        )
        with Image.open(attack_dir / "adversarial.png") as adv, Image.open(attack_dir / "original.png") as orig:
            our_change = float((to_pixels(adv) - to_pixels(orig)).abs().mean() * 255)
        transfer = ours.get("transfer", {}).get("adversarial", {}).get("target_prob")
        rows.append(
            f"| dog -> Siamese cat | transferlab (Lite0, eps = 1/255) | {ours['target_prob']:.3f} | "
            f"{transfer if transfer is None else f'{transfer:.3f}'} | | linf {ours['linf'] * 255:.0f}/255, "
            f"mean change {our_change:.2f}/255 per pixel, {ours['steps']} steps |"
        )
        side_by_side(
            args.out / "side_by_side" / "adversarial_dog.png",
            [
                (seeds / "original-dog.png", "lesson: original"),
                (seeds / "adversarial-dog.png", f"lesson: adversarial (Lite0 {theirs['Lite0']:.3f})"),
                (attack_dir / "adversarial.png", f"transferlab: eps 1/255 (Lite0 {ours['target_prob']:.3f})"),
                (attack_dir / "difference.png", f"transferlab: change x{ours['difference_amplification']:.0f}"),
            ],
        )
    (args.out / "comparison.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
