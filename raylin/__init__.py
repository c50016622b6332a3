"""raylin: convert pretrained transformers into linear-time students (XATL) and distil them (CALD)."""

from raylin.convert import TransferReport, convert
from raylin.models.plan import Plan, PlanError
from raylin.models.student import RaylinStudent, RaylinStudentConfig, load_student, register_auto_classes

register_auto_classes()

__version__ = "0.1.0"
__all__ = ["Plan", "PlanError", "RaylinStudent", "RaylinStudentConfig", "TransferReport", "convert", "load_student"]
