"""`make flash`: put the SDK, an engine package and the daemon on a device, safely and repeatably.

- device.sh: the device side, one idempotent subcommand a call (sent over SSH, nothing to install first);
- target.py: this machine or a device over SSH; rsync transfers that report what they sent;
- preflight.py: the device's facts against the package and its profile, before any change;
- flow.py: flash / rollback / unflash as named stages, releases switched by a symlink;
- health.py: run on the device: the daemon is online and answers through its broker.
"""
