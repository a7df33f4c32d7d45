"""A sampler written in plain torch from the documented `Sampler` protocol alone (no diffusers), for conformance tests."""
import hashlib
import math

import torch


class ToySampler:
    "A deterministic DDIM-like sampler on a variance-preserving schedule, with an analytic 'denoiser'."

    def __init__(self, num_steps: int = 8, batch_size: int = 3, size: int = 8, restartable: bool = True):
        self.num_steps, self.batch_size, self.size, self.restartable = num_steps, batch_size, size, restartable
        self.nfe = 0
        t = torch.linspace(0.98, 0.0, num_steps + 1, dtype=torch.float64)  # noise level of state k
        self.a, self.s = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
        self.levels = torch.stack([self.a, self.s], dim=1)  # (a_k, s_k) of state k, as DiffusersSampler gives them

    def __repr__(self):
        return f"ToySampler(num_steps={self.num_steps})"

    def replace(self, **changes):
        settings = dict(num_steps=self.num_steps, batch_size=self.batch_size, size=self.size, restartable=self.restartable)
        return ToySampler(**{**settings, **changes})

    def noise(self, seeds):
        return torch.cat([torch.randn(1, 3, self.size, self.size, generator=torch.Generator().manual_seed(int(s)))
                          for s in seeds])

    def condition(self, prompt):
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:7], "little")
        return torch.randn(1, 3, self.size, self.size, generator=torch.Generator().manual_seed(seed))

    def _x0(self, x, cond, k):
        self.nfe += len(x)
        return torch.tanh(x / (self.a[k] + self.s[k]).float() + cond)

    def _check(self, start, stop):
        if (start, stop) != (0, self.num_steps) and not self.restartable:
            raise RuntimeError("not restartable")

    def denoise(self, x, cond, start=0, stop=None, seeds=None):
        stop = self.num_steps if stop is None else stop
        self._check(start, stop)
        for k in range(start, stop):
            x0 = self._x0(x, cond, k)
            eps = (x - self.a[k].float() * x0) / self.s[k].float()
            x = self.a[k + 1].float() * x0 + self.s[k + 1].float() * eps
        return x

    def predict_x0(self, x, cond, step, seeds=None):
        self._check(step, step + 1)
        return x.clone() if step == self.num_steps else self._x0(x, cond, step)

    def renoise(self, x, from_step, to_step, generators=None):
        self._check(to_step, from_step)
        ratio = float(self.a[to_step] / self.a[from_step])
        std = math.sqrt(max(float(self.s[to_step]) ** 2 - (ratio * float(self.s[from_step])) ** 2, 0.0))
        eps = torch.cat([torch.randn(1, *x.shape[1:], generator=g) for g in generators])
        return ratio * x + std * eps

    def decode(self, latents):
        return ((latents.clamp(-1, 1) + 1) / 2).float()


class Red:
    "A verifier that likes red images."
    name = "red"

    def score(self, images, prompts):
        return images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))


class Bright:
    "A verifier that likes bright images."
    name = "bright"

    def score(self, images, prompts):
        return images.mean((1, 2, 3))
