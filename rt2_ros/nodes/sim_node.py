"""ROS 2 simulator node: the pybullet tabletop Panda speaking what a real arm driver speaks.

Publishes ``camera/image`` (sensor_msgs/Image rgb8, optionally ``camera/image/compressed``), the
wrist camera on ``wrist_camera/image`` (the same, ``sim_node.wrist_camera``), ``joint_states``
(sensor_msgs/JointState: 7 arm joints in rad, ``panda_finger_joint1/2`` in m, 0.04 open, 0
closed) and ``ee_pose`` (geometry_msgs/PoseStamped, measured grasp frame); accepts
``servo_node/delta_twist_cmds`` (geometry_msgs/TwistStamped, MoveIt Servo style: stale commands
> ``sim.command_timeout_s`` are dropped and the arm holds) and ``gripper_command``
(std_msgs/Float64). It knows nothing about tokens or policies.

Every image is stamped with the node clock just before it is rendered: physics does not advance
during a render (one thread), so the stamp is the time of the world the frame shows. With
``sim_node.wrist_camera_rate_hz`` 0 (the default) the wrist frame is rendered in the same timer
tick as the fixed camera's and carries the same stamp: a synchronised pair, as a policy that
reads both cameras wants (no skew to bound). A rate > 0 gives the wrist camera its own timer.

Ground truth for evaluation is on ``~/objects`` (visualization_msgs/MarkerArray, one cube
marker per object, ``ns`` = object name, ``text`` = "in_tray" when it lies in the tray).
"""

from __future__ import annotations

import time

import cv2
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import ColorRGBA, Float64
from visualization_msgs.msg import Marker, MarkerArray

from rt2_ros.nodes.common import COMMAND_QOS, declare_and_read, reject_unknown_overrides, rgb_to_image_msg, run_node
from rt2_ros.params import ParamSpec
from rt2_ros.sim.tabletop import SIM_PARAMS, SimCommandError, TabletopSim

NODE_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("sim_node.control_rate_hz", "double", 50.0, "Rate at which twists are applied and physics advances",
              "Hz", 5.0, 500.0),
    ParamSpec("sim_node.camera_rate_hz", "double", 15.0,
              "Camera frame rate (rendering is the costly part); above the policy's execute rate, because the "
              "policy sends each frame once: a camera slower than policy.execute_rate_hz caps the action rate",
              "Hz", 0.5, 60.0),
    ParamSpec("sim_node.publish_compressed", "bool", False,
              "Also publish JPEG frames on camera/image/compressed (and wrist_camera/image/compressed)"),
    ParamSpec("sim_node.wrist_camera", "bool", True,
              "Render and publish the wrist camera (sim.wrist_camera_*) on wrist_camera/image; 6-9 ms a frame "
              "at 128x128 (the fixed camera: 12-14 ms at 224x224)"),
    ParamSpec("sim_node.wrist_camera_rate_hz", "double", 0.0,
              "Wrist camera frame rate; 0: one wrist frame with every camera/image frame, with the same stamp",
              "Hz", 0.0, 60.0),
    ParamSpec("sim_node.seed", "int", 0, "Seed of the object placement jitter", "", 0, 2**31 - 1),
    ParamSpec("sim_node.gripper_open_value", "double", 0.0, "gripper_command value meaning fully open", "",
              -1e3, 1e3),
    ParamSpec("sim_node.gripper_closed_value", "double", 1.0, "gripper_command value meaning fully closed", "",
              -1e3, 1e3),
    ParamSpec("sim_node.frame_id", "string", "panda_link0", "Robot base frame of poses"),
    ParamSpec("sim_node.camera_frame_id", "string", "camera_optical_frame", "Frame id of camera images"),
    ParamSpec("sim_node.wrist_camera_frame_id", "string", "wrist_camera_optical_frame",
              "Frame id of wrist camera images"),
)

WRIST_TOPIC = "wrist_camera/image"


class SimNode(Node):
    def __init__(self, **kwargs) -> None:
        super().__init__("rt2_sim", **kwargs)
        params = declare_and_read(self, SIM_PARAMS + NODE_PARAMS)
        reject_unknown_overrides(self)
        self.sim = TabletopSim({k: v for k, v in params.items() if k in {s.name for s in SIM_PARAMS}},
                               seed=params["sim_node.seed"])
        self.frame_id = params["sim_node.frame_id"]
        self.camera_frame_id = params["sim_node.camera_frame_id"]
        self.wrist_frame_id = params["sim_node.wrist_camera_frame_id"]
        self._g_open = params["sim_node.gripper_open_value"]
        self._g_closed = params["sim_node.gripper_closed_value"]
        self._twist: TwistStamped | None = None
        self._last_tick = time.monotonic()
        self.latest_frame = None  # last rendered RGB images, for in-process users (rt2-bringup --sim)
        self.latest_wrist_frame = None

        compressed = params["sim_node.publish_compressed"]
        self.image_pub = self.create_publisher(Image, "camera/image", qos_profile_sensor_data)
        self.compressed_pub = self.create_publisher(CompressedImage, "camera/image/compressed",
                                                    qos_profile_sensor_data) if compressed else None
        wrist, wrist_rate = params["sim_node.wrist_camera"], params["sim_node.wrist_camera_rate_hz"]
        self.wrist_pub = self.create_publisher(Image, WRIST_TOPIC, qos_profile_sensor_data) if wrist else None
        self.wrist_compressed_pub = self.create_publisher(CompressedImage, WRIST_TOPIC + "/compressed",
                                                          qos_profile_sensor_data) if wrist and compressed else None
        self._wrist_with_camera = wrist and wrist_rate == 0.0
        self.joint_pub = self.create_publisher(JointState, "joint_states", qos_profile_sensor_data)
        self.pose_pub = self.create_publisher(PoseStamped, "ee_pose", qos_profile_sensor_data)
        self.objects_pub = self.create_publisher(MarkerArray, "~/objects", 10)
        self.create_subscription(TwistStamped, "servo_node/delta_twist_cmds", self._on_twist, COMMAND_QOS)
        self.create_subscription(Float64, "gripper_command", self._on_gripper, COMMAND_QOS)
        self.create_timer(1.0 / params["sim_node.control_rate_hz"], self._control_tick)
        self.create_timer(1.0 / params["sim_node.camera_rate_hz"], self._camera_tick)
        if wrist and not self._wrist_with_camera:
            self.create_timer(1.0 / wrist_rate, self._wrist_tick)
        self.create_timer(0.5, self._publish_objects)
        wc = self.sim.wrist_camera()
        wrist_text = "off" if not wrist else f"{wc.width}x{wc.height} @ " + (
            "the camera's rate, same stamps" if self._wrist_with_camera else f"{wrist_rate} Hz")
        self.get_logger().info(f"simulated Panda ready: objects {', '.join(self.sim.object_names)}, "
                               f"camera {self.sim.camera.width}x{self.sim.camera.height} "
                               f"@ {params['sim_node.camera_rate_hz']} Hz, wrist camera {wrist_text}")

    def _on_twist(self, msg: TwistStamped) -> None:
        self._twist = msg

    def _on_gripper(self, msg: Float64) -> None:
        span = self._g_closed - self._g_open
        closedness = (msg.data - self._g_open) / span if span else 0.0
        try:
            self.sim.set_gripper(closedness)
        except SimCommandError as exc:
            self.get_logger().warning(f"gripper command ignored: {exc}", throttle_duration_sec=2.0)

    def _control_tick(self) -> None:
        now = time.monotonic()
        dt, self._last_tick = now - self._last_tick, now
        dt = min(dt, 0.1)  # after a stall, do not integrate a huge step
        tw = self._twist
        if tw is not None:
            stamp = tw.header.stamp.sec + tw.header.stamp.nanosec * 1e-9
            age = self.get_clock().now().nanoseconds * 1e-9 - stamp
            lin, ang = tw.twist.linear, tw.twist.angular
            try:
                self.sim.apply_twist((lin.x, lin.y, lin.z), (ang.x, ang.y, ang.z), age, dt)
            except SimCommandError as exc:
                self.get_logger().warning(f"twist ignored: {exc}", throttle_duration_sec=2.0)
        self.sim.step(dt)
        self._publish_state()

    def _publish_state(self) -> None:
        stamp = self.get_clock().now().to_msg()
        js = self.sim.joint_state()
        msg = JointState()
        msg.header.stamp = stamp
        msg.name = list(js.names)
        msg.position = [float(v) for v in js.positions]
        msg.velocity = [float(v) for v in js.velocities]
        self.joint_pub.publish(msg)
        p, q = self.sim.ee_pose()
        pose = PoseStamped()
        pose.header.stamp, pose.header.frame_id = stamp, self.frame_id
        pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = (float(v) for v in p)
        pose.pose.orientation.w, pose.pose.orientation.x = float(q[0]), float(q[1])
        pose.pose.orientation.y, pose.pose.orientation.z = float(q[2]), float(q[3])
        self.pose_pub.publish(pose)

    def _camera_tick(self) -> None:
        stamp = self.get_clock().now().to_msg()  # the frame shows the world as of now
        self.latest_frame = self.sim.render()
        self._publish_image(self.latest_frame, stamp, self.camera_frame_id, self.image_pub, self.compressed_pub)
        if self._wrist_with_camera:  # no physics step in between: the same world, the same stamp
            self._render_wrist(stamp)

    def _wrist_tick(self) -> None:
        self._render_wrist(self.get_clock().now().to_msg())

    def _render_wrist(self, stamp) -> None:
        if self.wrist_pub is None:
            return
        self.latest_wrist_frame = self.sim.render(camera="wrist")
        self._publish_image(self.latest_wrist_frame, stamp, self.wrist_frame_id, self.wrist_pub,
                            self.wrist_compressed_pub)

    @staticmethod
    def _publish_image(image, stamp, frame_id: str, raw_pub, compressed_pub) -> None:
        raw_pub.publish(rgb_to_image_msg(image, stamp, frame_id))
        if compressed_pub is not None:
            ok, jpeg = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            if ok:
                c = CompressedImage(format="jpeg", data=jpeg.tobytes())
                c.header.stamp, c.header.frame_id = stamp, frame_id
                compressed_pub.publish(c)

    def _publish_objects(self) -> None:
        stamp = self.get_clock().now().to_msg()
        markers = []
        for i, (name, pos) in enumerate(sorted(self.sim.object_positions().items())):
            m = Marker(ns=name, id=i, type=Marker.CUBE, action=Marker.ADD)
            m.header.stamp, m.header.frame_id = stamp, self.frame_id
            m.pose.position.x, m.pose.position.y, m.pose.position.z = (float(v) for v in pos)
            m.pose.orientation.w = 1.0
            m.scale.x = m.scale.y = m.scale.z = 0.04
            m.color = ColorRGBA(r=0.8, g=0.8, b=0.8, a=0.6)
            m.text = "in_tray" if name != "tray" and self.sim.is_in_tray(name) else ""
            markers.append(m)
        self.objects_pub.publish(MarkerArray(markers=markers))

    def close(self) -> None:
        self.sim.close()


def main(args: list[str] | None = None) -> int:
    return run_node(SimNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
