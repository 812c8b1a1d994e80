"""Files the ``featup`` command ships: the demo's offline model (``teacher16_jbu.ckpt``) and how to remake it."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
TEACHER_JBU = ASSETS / "teacher16_jbu.ckpt"  # a JBU trained on the ground-truth teacher (featup.backbones.teacher:teacher16)
