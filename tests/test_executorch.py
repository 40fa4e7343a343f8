"""deploy.mobile on small networks: a vision transformer, a network whose batch cannot be symbolic, no calibration.

The species model's model.pte and model.int8.pte are checked where the export writes them, in tests/test_int8.py
(one export for both files: lowering Lite0 to XNNPACK is about 20 s of CPU in fp32 and 40 s in int8 on one core).
"""

from __future__ import annotations

import pytest
import torch

from transferlab.core.errors import DataError
from transferlab.deploy import mobile
from transferlab.deploy.export import largest_difference, sample_inputs

pytest.importorskip("executorch", reason="the `mobile` extra (executorch) is not installed")

TOLERANCE = 1e-3  # fp32 XNNPACK kernels sum in another order than torch's
CALIBRATION_IMAGES = 16  # "a few" training photos: what a user has at hand for calibration


def test_a_vision_transformer_exports_too(tmp_path):
    """Token models (patch embedding, attention, class token expanded to the batch) take the same path."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8, depth=1).eval()
    info = mobile.export_pte(vit, tmp_path / "vit.pte", 32)
    inputs = [*sample_inputs(32), torch.randn(mobile.MAX_BATCH + 5, 3, 32, 32)]  # the last: more than one program run
    with torch.inference_mode():
        expected = [vit(x) for x in inputs]
    assert info["dynamic_batch"] is True
    assert largest_difference(expected, mobile.pte_logits(tmp_path / "vit.pte", inputs)) <= TOLERANCE


class BatchDependent(torch.nn.Module):
    """Branches on the batch size (same answer either way): torch.export cannot make such a batch symbolic."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.fc(self.conv(images).mean((2, 3)))
        return logits.clone() if images.shape[0] > 4 else logits


def test_a_network_without_a_dynamic_batch_is_written_for_batch_1_and_run_image_by_image(tmp_path):
    torch.manual_seed(0)
    network = BatchDependent().eval()
    info = mobile.export_pte(network, tmp_path / "fixed.pte", 16)
    assert info["dynamic_batch"] is False and info["max_batch"] == 1
    inputs = sample_inputs(16)
    with torch.inference_mode():
        expected = [network(x) for x in inputs]
    assert largest_difference(expected, mobile.pte_logits(tmp_path / "fixed.pte", inputs)) <= TOLERANCE


def test_int8_without_calibration_images_says_so(tmp_path):
    with pytest.raises(DataError, match="no calibration images"):
        mobile.export_pte(BatchDependent().eval(), tmp_path / "x.pte", 16, calibration=[torch.zeros(0, 3, 16, 16)])
    assert not (tmp_path / "x.pte").exists()
