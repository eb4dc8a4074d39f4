"""Devices: the data x expert mesh and every array's layout on it (`mesh`), the
stacked experts run one share per device (`expert_parallel`), and joining the
processes of a multi-host run (`distributed`).

The partitioning rules live here only, below routing, evaluation and training,
which all place arrays on the mesh.
"""
