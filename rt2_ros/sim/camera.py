"""A pinhole camera model shared by the simulator and the embedded reference policy.

The simulator renders through this model and the ``embedded`` backend un-projects pixels
through it, so both sides agree on geometry by construction. On a real robot the integrator
enters the calibrated intrinsics and the camera pose (``backend.embedded.camera_*``) and the
same code runs unchanged.

Conventions (the ones ROS ``sensor_msgs/CameraInfo`` and OpenCV use):

* intrinsics ``fx, fy, cx, cy`` in pixels, pixel centres at integer coordinates, ``u`` to the
  right, ``v`` down;
* extrinsics: the pose of the *optical* frame (z forward, x right, y down) in the robot base
  frame, as a position in metres and a unit quaternion ``(w, x, y, z)``.

Rejected: a field-of-view + look-at description as the configuration format. It is handy for
a simulated camera (see :func:`look_at`) but a calibrated real camera comes as intrinsics and
a pose, so that is what the parameters hold. No lens distortion: the embedded policy only
needs centroid accuracy of a few millimetres, and users with strong distortion should
rectify upstream (``image_proc``) as ROS pipelines usually do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import transforms3d.quaternions as tq

from rt2_ros.params import ParamSpec


class CameraError(ValueError):
    """Invalid camera parameters, or a pixel ray that does not meet the requested plane."""


def look_at(eye: Sequence[float], target: Sequence[float], up: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Quaternion (w, x, y, z) of an optical frame at ``eye`` looking at ``target``.

    ``up`` is the base-frame direction that should appear upwards in the image.
    """
    eye_v, target_v, up_v = (np.asarray(a, dtype=np.float64).reshape(3) for a in (eye, target, up))
    z = target_v - eye_v
    if np.linalg.norm(z) < 1e-9:
        raise CameraError("look_at: eye and target coincide")
    z /= np.linalg.norm(z)
    x = np.cross(z, up_v)  # image right = forward x up; optical y (down) completes the frame
    if np.linalg.norm(x) < 1e-9:
        raise CameraError("look_at: the viewing direction is parallel to 'up'; choose another up vector")
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return tq.mat2quat(np.column_stack([x, y, z]))


def focal_from_fov(size_px: int, fov_deg: float) -> float:
    """Focal length in pixels for a full field of view of ``fov_deg`` across ``size_px`` pixels."""
    return 0.5 * size_px / math.tan(math.radians(fov_deg) / 2.0)


@dataclass(frozen=True)
class PinholeCamera:
    """Intrinsics (pixels) plus the optical frame's pose in the robot base frame."""

    width: int  # px
    height: int  # px
    fx: float  # px
    fy: float  # px
    cx: float  # px, integer pixel centres
    cy: float  # px
    position: np.ndarray  # (3,) m, optical-frame origin in the base frame
    orientation: np.ndarray  # (4,) quaternion (w, x, y, z), optical frame -> base frame

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise CameraError(f"camera size must be positive, got {self.width}x{self.height}")
        for key in ("fx", "fy", "cx", "cy"):
            value = float(getattr(self, key))
            if not math.isfinite(value):
                raise CameraError(f"camera {key} must be finite, got {value}")
            object.__setattr__(self, key, value)
        if self.fx <= 0 or self.fy <= 0:
            raise CameraError(f"camera focal lengths must be positive, got fx={self.fx} fy={self.fy}")
        pos = np.asarray(self.position, dtype=np.float64).reshape(3)
        quat = np.asarray(self.orientation, dtype=np.float64).reshape(4)
        if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(quat))):
            raise CameraError("camera position and orientation must be finite")
        norm = float(np.linalg.norm(quat))
        if norm < 1e-6:
            raise CameraError("camera orientation quaternion (w, x, y, z) has zero length")
        object.__setattr__(self, "position", pos)
        object.__setattr__(self, "orientation", quat / norm)  # accept slightly unnormalised calibration

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_look_at(cls, width: int, height: int, fov_y_deg: float, eye: Sequence[float],
                     target: Sequence[float], up: Sequence[float] = (0.0, 0.0, 1.0)) -> PinholeCamera:
        """A square-pixel camera with vertical field of view ``fov_y_deg`` aimed from ``eye`` at ``target``."""
        f = focal_from_fov(height, fov_y_deg)
        return cls(width, height, f, f, (width - 1) / 2.0, (height - 1) / 2.0,
                   np.asarray(eye, dtype=np.float64), look_at(eye, target, up))

    @classmethod
    def from_params(cls, values: Mapping[str, Any], prefix: str) -> PinholeCamera:
        """Build from validated parameters ``<prefix>width``, ``<prefix>fx``, ... (:func:`camera_param_specs`)."""
        try:
            return cls(int(values[prefix + "width"]), int(values[prefix + "height"]),
                       values[prefix + "fx"], values[prefix + "fy"], values[prefix + "cx"], values[prefix + "cy"],
                       np.asarray(values[prefix + "position"]), np.asarray(values[prefix + "orientation"]))
        except KeyError as exc:
            raise CameraError(f"missing camera parameter {exc.args[0]}") from None
        except CameraError as exc:
            raise CameraError(f"{prefix}*: {exc}") from None

    def scaled(self, width: int, height: int) -> PinholeCamera:
        """The same camera with intrinsics scaled to a resized (not cropped) ``width`` x ``height`` image."""
        if (width, height) == (self.width, self.height):
            return self
        sx, sy = width / self.width, height / self.height
        # pixel centres are at integers, so the pixel *edges* scale: (c + 0.5) * s - 0.5
        return PinholeCamera(width, height, self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5,
                             (self.cy + 0.5) * sy - 0.5, self.position, self.orientation)

    # ------------------------------------------------------------------ geometry
    @property
    def rotation(self) -> np.ndarray:
        """3x3 rotation optical frame -> base frame (columns: image right, image down, forward)."""
        return tq.quat2mat(self.orientation)

    @property
    def matrix(self) -> np.ndarray:
        """3x3 intrinsic matrix K."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def to_camera(self, points_base: np.ndarray) -> np.ndarray:
        """Points (N, 3) or (3,) from the base frame into the optical frame."""
        pts = np.asarray(points_base, dtype=np.float64)
        return (pts - self.position) @ self.rotation  # R^T (p - t), row-vector form

    def project(self, points_base: np.ndarray) -> np.ndarray:
        """Pixel coordinates (N, 2) or (2,) of base-frame points; NaN for points at or behind the camera."""
        pts_cam = self.to_camera(points_base)
        z = pts_cam[..., 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = self.fx * pts_cam[..., 0] / z + self.cx
            v = self.fy * pts_cam[..., 1] / z + self.cy
        uv = np.stack([u, v], axis=-1)
        uv[z <= 1e-9] = np.nan
        return uv

    def pixel_ray(self, u: float, v: float) -> np.ndarray:
        """Unit direction (base frame) of the ray through pixel (u, v)."""
        d_cam = np.array([(u - self.cx) / self.fx, (v - self.cy) / self.fy, 1.0])
        d = self.rotation @ d_cam
        return d / np.linalg.norm(d)

    def pixel_to_table_plane(self, u: float, v: float, z_plane: float = 0.0) -> np.ndarray:
        """Base-frame point (3,) where the ray through pixel (u, v) meets the plane z = ``z_plane`` (m).

        Raises CameraError if the ray is parallel to the plane or meets it behind the camera.
        """
        if not (math.isfinite(u) and math.isfinite(v) and math.isfinite(z_plane)):
            raise CameraError(f"pixel_to_table_plane: non-finite input u={u} v={v} z={z_plane}")
        d = self.pixel_ray(u, v)
        if abs(d[2]) < 1e-9:
            raise CameraError(f"pixel ({u:.1f}, {v:.1f}) looks parallel to the plane z={z_plane}")
        t = (z_plane - self.position[2]) / d[2]
        if t <= 0:
            raise CameraError(f"pixel ({u:.1f}, {v:.1f}) does not look towards the plane z={z_plane}")
        return self.position + t * d

    # ------------------------------------------------------------------ OpenGL (renderers)
    def opengl_view_matrix(self) -> tuple[float, ...]:
        """Column-major 4x4 base -> OpenGL camera (x right, y up, z backwards) matrix, as pybullet expects."""
        r_cv_base = self.rotation.T  # base -> optical
        r_gl_base = np.diag([1.0, -1.0, -1.0]) @ r_cv_base
        view = np.eye(4)
        view[:3, :3] = r_gl_base
        view[:3, 3] = -r_gl_base @ self.position
        return tuple(float(x) for x in view.flatten(order="F"))

    def opengl_projection_matrix(self, near: float = 0.05, far: float = 5.0) -> tuple[float, ...]:
        """Column-major 4x4 OpenGL projection reproducing these intrinsics exactly (incl. off-centre cx, cy)."""
        if not 0 < near < far:
            raise CameraError(f"need 0 < near < far, got near={near} far={far}")
        w, h = self.width, self.height
        # +0.5: OpenGL pixel centres are at half-integers, ours at integers.
        cx, cy = self.cx + 0.5, self.cy + 0.5
        proj = np.array([
            [2.0 * self.fx / w, 0.0, 1.0 - 2.0 * cx / w, 0.0],
            [0.0, 2.0 * self.fy / h, 2.0 * cy / h - 1.0, 0.0],
            [0.0, 0.0, -(far + near) / (far - near), -2.0 * far * near / (far - near)],
            [0.0, 0.0, -1.0, 0.0],
        ])
        return tuple(float(x) for x in proj.flatten(order="F"))


# The default camera: in front of the table, offset 0.25 m towards -y, facing the robot,
# looking down at the workspace at about 40 degrees.
# Both the simulator (sim.camera_*) and the embedded policy (backend.embedded.camera_*) default
# to it, so the simulated setup works out of the box; a real setup overrides the latter.
DEFAULT_CAMERA_EYE = (1.20, -0.25, 0.80)  # m, base frame
DEFAULT_CAMERA_TARGET = (0.48, 0.0, 0.10)  # m, base frame
DEFAULT_CAMERA_FOV_Y_DEG = 50.0
DEFAULT_CAMERA = PinholeCamera.from_look_at(224, 224, DEFAULT_CAMERA_FOV_Y_DEG, DEFAULT_CAMERA_EYE,
                                            DEFAULT_CAMERA_TARGET)


def camera_param_specs(prefix: str, who: str, default: PinholeCamera = DEFAULT_CAMERA) -> tuple[ParamSpec, ...]:
    """ParamSpecs ``<prefix>width`` ... ``<prefix>orientation`` describing a camera for ``who`` (docs text)."""
    d = default
    return (
        ParamSpec(prefix + "width", "int", d.width, f"{who}: image width the intrinsics refer to", "px", 1, 8192),
        ParamSpec(prefix + "height", "int", d.height, f"{who}: image height the intrinsics refer to", "px", 1, 8192),
        ParamSpec(prefix + "fx", "double", round(d.fx, 4), f"{who}: focal length x", "px", 1e-3, 1e6),
        ParamSpec(prefix + "fy", "double", round(d.fy, 4), f"{who}: focal length y", "px", 1e-3, 1e6),
        ParamSpec(prefix + "cx", "double", round(d.cx, 4), f"{who}: principal point x (pixel centres at integers)",
                  "px", -1e5, 1e5),
        ParamSpec(prefix + "cy", "double", round(d.cy, 4), f"{who}: principal point y", "px", -1e5, 1e5),
        ParamSpec(prefix + "position", "double_array", [round(float(x), 6) for x in d.position],
                  f"{who}: optical-frame origin in the robot base frame", "m", -100.0, 100.0, length=3),
        ParamSpec(prefix + "orientation", "double_array", [round(float(x), 6) for x in d.orientation],
                  f"{who}: optical frame (z forward, x right, y down) in the base frame, quaternion (w, x, y, z)",
                  "", -1.0, 1.0, length=4),
    )


__all__ = ["DEFAULT_CAMERA", "CameraError", "PinholeCamera", "camera_param_specs", "focal_from_fov", "look_at"]
