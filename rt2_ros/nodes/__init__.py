"""Thin rclpy adapters over the pure core: ROS messages in, core calls, ROS messages out."""
