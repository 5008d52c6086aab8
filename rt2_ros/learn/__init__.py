"""The RT-2 recipe on a laptop: demonstrations from the simulator, a dataset in LeRobot's format,
a small VLA trained to answer in action tokens, and its evaluation (issue 16).

Pure Python (no rclpy): ``collect`` drives the simulator with the reference policy, ``dataset``
writes and reads LeRobot datasets (and exports ``rt2-record`` MCAP files to them), ``train``
fine-tunes a small Hugging Face VLM-architecture model, ``evaluate`` runs held-out seeds.
"""
