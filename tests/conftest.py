"""What is specific to pykvm's own suite; every fixture and marker comes from the pykvm pytest plugin.

The plugin (``pykvm.testing.plugin``, enabled by installing pykvm) provides
``kvm``, ``vm``, ``vcpu``, ``guest``, ``host``, ``boot`` and ``machine``, the
hardware marker, ``PYKVM_REQUIRE_KVM=1`` and the summary line counting the
hardware tests.
"""
