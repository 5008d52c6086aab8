"""Start rt2_ros: ``ros2 launch rt2_ros rt2.launch.py [params_file:=...] [backend:=grpc] [sim:=true]``.

The same nodes and YAML as ``rt2-bringup`` (which pip-only machines use instead), one process
per node. ``backend`` overrides ``backend.type`` of the policy node; topic names are remapped
the ROS way (``camera/image``, ``instruction``, ``ee_pose``, ``arm_action``,
``servo_node/delta_twist_cmds``, ``gripper_command`` ...), see the README.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def _nodes(context, *args, **kwargs):
    params_file = LaunchConfiguration("params_file").perform(context)
    backend = LaunchConfiguration("backend").perform(context)
    sim = LaunchConfiguration("sim").perform(context).lower() in ("true", "1", "yes")
    policy_params = [params_file] + ([{"backend.type": backend}] if backend else [])
    nodes = [
        Node(package="rt2_ros", executable="safety_node", name="rt2_safety", output="screen",
             parameters=[params_file]),
        Node(package="rt2_ros", executable="policy_node", name="rt2_policy", output="screen",
             parameters=policy_params),
    ]
    if sim:
        nodes.append(Node(package="rt2_ros", executable="sim_node", name="rt2_sim", output="screen",
                          parameters=[params_file]))
    return nodes


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("rt2_ros"), "config", "rt2.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="ROS 2 params YAML for all rt2_ros nodes"),
        DeclareLaunchArgument("backend", default_value="",
                              description="override backend.type (embedded, local, grpc, openvla_http, openpi, "
                                          "openai); empty keeps the params file's choice"),
        DeclareLaunchArgument("sim", default_value="false",
                              description="also start the simulated tabletop arm (pybullet)"),
        OpaqueFunction(function=_nodes),
    ])
