"""Widgets for the notebooks: a live loss plot for train(on_log=...), and ipywidgets explorers of the latents.

ipywidgets and IPython are imported only when used; each explorer has a static `figure` stand-in for papermill.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from vaehelpers.latents import decode, encode, interpolate
from vaehelpers.metrics import image_psnr
from vaehelpers.viz import image_grid, interpolation_figure, loss_curve_figure, to_numpy_image

# --------------------------------------------------------------------------- live loss plot


class LiveLossPlot:
    """A train(on_log=...) callback: keeps the rows, and every `every` rows redraws the loss curve in place (one
    display handle) or, when not interactive (papermill, a log file), prints one line instead."""

    def __init__(self, every: int = 50, *, interactive: bool = True, smooth: int = 0) -> None:
        self.every, self.interactive, self.smooth = max(1, every), interactive, smooth
        self.rows: list[dict[str, Any]] = []
        self._handle: Any = None

    def __call__(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) % self.every:
            return
        if not self.interactive:
            losses = "  ".join(
                f"{key.split('/')[-1]} {value:.4g}"
                for key, value in row.items()
                if key in ("train/total_loss", "train/rec_loss", "train/kl_loss")
            )
            print(f"step {row.get('step')}  epoch {row.get('epoch')}  {losses}", flush=True)
            return
        from IPython.display import display

        figure = self.figure()
        if self._handle is None:
            self._handle = display(figure, display_id=True)
        else:
            self._handle.update(figure)

    def figure(self, max_points: int = 2000) -> Figure:
        """The loss curve of the rows seen so far, thinned to about max_points (redraws stay cheap in long runs)."""
        return loss_curve_figure(self.rows[:: max(1, len(self.rows) // max_points)], smooth=self.smooth)


# --------------------------------------------------------------------------- widgets


def png_bytes(images: Sequence[Tensor], height: int = 192, gap: int = 4) -> bytes:
    """Images (3, H, W) in [-1, 1] side by side as one PNG, each scaled (nearest) to `height` pixels."""
    import io

    from PIL import Image

    panels = []
    for image in images:
        array = to_numpy_image(image, as_uint8=True)  # (H, W, 3)
        width = max(1, round(array.shape[1] * height / array.shape[0]))
        panels.append(np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.NEAREST)))
    spacer = np.full((height, gap, 3), 255, dtype=np.uint8)
    row = np.concatenate([part for panel in panels for part in (panel, spacer)][:-1], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(row).save(buffer, format="PNG")
    return buffer.getvalue()


class LatentExplorer:
    """Pick an image, shift and scale each latent channel with sliders, and see the decoder's answer at once.

    images (N, 3, H, W) in [-1, 1] are encoded once (posterior means). Channel c of the edited latents is
    scale_c * z_c + offset_c * sigma_c, where sigma_c is channel c's std (the model's measured latents_std where
    `vaehelpers scale` stored it, else the std over these images), so that an offset of 1 moves a channel by one
    typical deviation whatever the model. The view shows original | decoded edit.
    In a notebook the explorer displays as its widget; `channel_figure()` is the static stand-in (papermill).
    """

    def __init__(
        self, model: Any, images: Tensor, *, max_offset: float = 3.0, max_scale: float = 3.0, height: int = 192
    ) -> None:
        import ipywidgets as widgets
        import torch

        self.model, self.images, self.height = model, images.detach().float().cpu(), height
        self.latents = encode(model, self.images)  # (N, L, h, w)
        measured = getattr(getattr(model, "config", None), "latents_std", ())
        self.channel_std = (
            torch.tensor(measured, dtype=torch.float32)
            if measured  # (L,), over a whole dataset
            else self.latents.std(dim=(0, 2, 3)).clamp(min=1e-6)
        )  # (L,); N=1 still has h*w values
        channels = self.latents.shape[1]
        self.picker = widgets.IntSlider(value=0, min=0, max=len(self.images) - 1, description="image")
        self.offsets = [
            widgets.FloatSlider(value=0.0, min=-max_offset, max=max_offset, step=0.1, description=f"offset {c}")
            for c in range(channels)
        ]
        self.scales = [
            widgets.FloatSlider(value=1.0, min=0.0, max=max_scale, step=0.1, description=f"scale {c}")
            for c in range(channels)
        ]
        self.reset_button = widgets.Button(description="reset sliders")
        self.image = widgets.Image(format="png")
        self.caption = widgets.Label()
        self._holding = False
        for slider in (self.picker, *self.offsets, *self.scales):
            slider.observe(self._update, names="value")
        self.reset_button.on_click(lambda _button: self.reset())
        self.widget = widgets.VBox(
            [
                self.picker,
                widgets.HBox([widgets.VBox(self.offsets), widgets.VBox(self.scales)]),
                self.reset_button,
                self.image,
                self.caption,
            ]
        )
        self._update()

    def edited_latents(self) -> Tensor:
        """The picked image's latents after the sliders: (1, L, h, w)."""
        import torch

        scale = torch.tensor([slider.value for slider in self.scales]).view(1, -1, 1, 1)
        offset = torch.tensor([slider.value for slider in self.offsets]).view(1, -1, 1, 1)
        return self.latents[self.picker.value][None] * scale + offset * self.channel_std.view(1, -1, 1, 1)

    def decoded(self) -> Tensor:
        """The decoded edit, (3, H, W)."""
        return decode(self.model, self.edited_latents())[0]

    def reset(self) -> None:
        """Every offset back to 0 and every scale to 1 (one redraw)."""
        self._holding = True
        for slider in self.offsets:
            slider.value = 0.0
        for slider in self.scales:
            slider.value = 1.0
        self._holding = False
        self._update()

    def _update(self, _change: Any = None) -> None:
        if self._holding:
            return
        decoded = self.decoded()
        self.image.value = png_bytes([self.images[self.picker.value], decoded], self.height)
        self.caption.value = f"image {self.picker.value}: original | decoded edit (PSNR {image_psnr(self.images[self.picker.value], decoded):.2f} dB)"

    def channel_figure(self, offset: float = 2.0) -> Figure:
        """Static stand-in: the picked image decoded with each channel moved by -offset, 0 and +offset sigma."""
        import torch

        latents = self.latents[self.picker.value]  # (L, h, w)
        rows, titles = [], []
        for channel in range(latents.shape[0]):
            for shift in (-offset, 0.0, offset):
                edited = latents.clone()
                edited[channel] += shift * self.channel_std[channel]
                rows.append(edited)
                titles.append(f"channel {channel}: {shift:+g} sigma")
        return image_grid(decode(self.model, torch.stack(rows)), nrow=3, titles=titles)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


class InterpolationExplorer:
    """A slider t from 0 to 1 that decodes (1 - t) * z_a + t * z_b between two images' latents, live.

    The view shows image a | decoded | image b; `figure()` is the static stand-in (decoded at 7 values of t).
    """

    def __init__(self, model: Any, image_a: Tensor, image_b: Tensor, *, steps: int = 20, height: int = 192) -> None:
        import ipywidgets as widgets
        import torch

        self.model, self.height = model, height
        self.images = torch.stack([image_a, image_b]).detach().float().cpu()  # (2, 3, H, W)
        self.latents = encode(model, self.images)  # (2, L, h, w)
        self.slider = widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=1 / steps, description="t")
        self.image = widgets.Image(format="png")
        self.slider.observe(self._update, names="value")
        self.widget = widgets.VBox([self.slider, self.image])
        self._update()

    def decoded(self) -> Tensor:
        """The image decoded at the slider's t, (3, H, W)."""
        t = float(self.slider.value)
        return decode(self.model, ((1 - t) * self.latents[0] + t * self.latents[1])[None])[0]

    def _update(self, _change: Any = None) -> None:
        self.image.value = png_bytes([self.images[0], self.decoded(), self.images[1]], self.height)

    def figure(self, steps: int = 7) -> Figure:
        return interpolation_figure(interpolate(self.model, self.images[0], self.images[1], steps))

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
