"""The core layer: the binding and one object per KVM file descriptor.

Why this exists: everything else in pykvm is built on ``Kvm`` -> ``Vm`` ->
``Vcpu`` (thin wrappers named after their ioctls, typed exits, state records,
typed errors). The core knows KVM's API and nothing about the hosts, the
architecture beyond what the API's structs say, or the guests; a test keeps it
that way (``tests/test_layers.py``).
"""
