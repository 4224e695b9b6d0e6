"""A labgrid strategy that brings a memfw board to "loader ready".

States: ``unknown`` -> ``off`` -> ``loader-ready``.

- ``off``: the console is closed and the board powered off.
- ``loader-ready``: the board is power-cycled with the console open, and the
  strategy waits (``timeout`` seconds) for the resident loader's banner, a
  line matching ``ready`` (default ``memfw-loader \\S+ board=\\S+ ready``).
  Then it closes the console again, so that ``cargo qemu test --labgrid``
  (or anything else) can open the network serial port: a raw TCP serial
  port serves one client at a time.

Use it from an environment file::

    imports:
      - memfw_strategy.py
    targets:
      main:
        drivers:
          MemfwLoaderStrategy:
            ready: 'memfw-loader \\S+ board=\\S+ ready'
            timeout: 30.0

It binds a ``PowerProtocol`` (``NetworkPowerDriver``, ``ExternalPowerDriver``,
...) and a ``ConsoleProtocol`` (``SerialDriver``).
"""

import enum
import re
import time

import attr

from labgrid.factory import target_factory
from labgrid.step import step
from labgrid.strategy import Strategy, StrategyError
from labgrid.strategy.common import never_retry

#: What the resident loader prints once it listens on the console.
LOADER_READY = r"memfw-loader \S+ board=\S+ ready"


class Status(enum.Enum):
    unknown = 0
    off = 1
    loader_ready = 2

    @classmethod
    def parse(cls, name):
        if isinstance(name, cls):
            return name
        return cls[str(name).replace("-", "_")]


@target_factory.reg_driver
@attr.s(eq=False)
class MemfwLoaderStrategy(Strategy):
    """Power-cycles the board and waits for the loader's ready line."""

    bindings = {
        "power": "PowerProtocol",
        "console": "ConsoleProtocol",
    }

    ready = attr.ib(default=LOADER_READY, validator=attr.validators.instance_of(str))
    timeout = attr.ib(default=30.0, converter=float)
    status = attr.ib(default=Status.unknown)
    #: The line that matched on the last transition to loader-ready.
    banner = attr.ib(default=None)

    def _open_console(self, once):
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self.target.activate(self.console)
                return True
            except Exception:  # refused: not there yet
                if once:
                    return False
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    @never_retry
    @step(args=["status"])
    def transition(self, status, *, step):  # pylint: disable=redefined-outer-name
        status = Status.parse(status)
        if status == Status.unknown:
            raise StrategyError(f"can not transition to {status}")
        if status == self.status:
            step.skip("nothing to do")
            return
        if status == Status.off:
            self.target.deactivate(self.console)
            self.target.activate(self.power)
            self.power.off()
        elif status == Status.loader_ready:
            self.transition(Status.off)
            # Open the console before power comes back, so nothing the
            # board prints first is lost; a network serial port that only
            # exists while the board is powered (a QEMU model's) is opened
            # as soon as it answers.
            opened = self._open_console(once=True)
            self.power.on()
            if not opened:
                self._open_console(once=False)
            pattern = re.compile(self.ready.encode())
            _, _, match, _ = self.console.expect(pattern, timeout=self.timeout)
            self.banner = match.group(0).decode(errors="replace")
            self.target.deactivate(self.console)
        else:
            raise StrategyError(f"no transition found from {self.status} to {status}")
        self.status = status
