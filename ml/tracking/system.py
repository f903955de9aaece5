"""Host, process and GPU usage sampled on a background thread, with peaks for the run summary.

Every ``interval_s`` the sampler calls ``log(key, value, step)`` (normally ``MetricBuffer.log``)
for each reading, ``step`` being the sample number. Disk and network counters are bytes since
:meth:`SystemMetricsSampler.start`, so a run's readings do not include the host's earlier traffic.
GPU readings come through NVML (``nvidia-ml-py``) when ``nvmlInit`` succeeds; otherwise the reason
is logged once and GPU readings are skipped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

_logger = logging.getLogger(__name__)

LogMetric = Callable[[str, float, int], None]


class SystemMetricsSampler:
    """Samples psutil (and NVML when present) every ``interval_s`` seconds and keeps the peaks.

    Keys (with the default ``prefix="system/"``): ``cpu_percent``, ``process_rss_mb``,
    ``memory_used_percent``, ``disk_read_bytes``, ``disk_write_bytes``, ``net_sent_bytes``,
    ``net_recv_bytes`` and, per GPU ``i``, ``gpu{i}/utilization_percent``,
    ``gpu{i}/memory_used_mb``, ``gpu{i}/temperature_c``, ``gpu{i}/power_w``.

    Args:
        log: Receives each reading; an exception from it is logged, never raised into the sampler.
        interval_s: Seconds between samples.
        prefix: Prepended to every key.
        gpu: Try NVML at all (``False`` skips it without a log line).
    """

    def __init__(self, log: LogMetric, interval_s: float, prefix: str = "system/", gpu: bool = True) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self._log = log
        self._interval_s = interval_s
        self._prefix = prefix
        self._want_gpu = gpu
        self._peaks: dict[str, float] = {}
        self._peaks_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._step = 0
        self._process: Any = None
        self._baseline_disk: Any = None
        self._baseline_net: Any = None
        self._nvml: Any = None
        self._gpu_handles: list[Any] = []
        # (gpu index, reading) pairs NVML refused once, e.g. power on boards without a sensor.
        self._unsupported: set[tuple[int, str]] = set()
        self._log_failed = False

    def start(self) -> None:
        """Takes the counter baselines, opens NVML if it can, and starts sampling."""
        if self._thread is not None:
            raise RuntimeError("the sampler is already started")
        import psutil

        self._process = psutil.Process()
        # cpu_percent measures since its previous call; this first call sets that reference point.
        psutil.cpu_percent(interval=None)
        self._baseline_disk = psutil.disk_io_counters()
        self._baseline_net = psutil.net_io_counters()
        if self._want_gpu:
            self._open_nvml()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="SystemMetricsSampler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stops sampling and releases NVML. Safe to call again, or before :meth:`start`."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception as exc:
                _logger.debug("nvmlShutdown failed: %s", exc)
            self._nvml = None
            self._gpu_handles = []

    def peaks(self) -> dict[str, float]:
        """The highest value seen per key, keyed like the readings with ``peak/`` after the prefix."""
        with self._peaks_lock:
            return {self._prefix + "peak/" + key[len(self._prefix):]: value for key, value in self._peaks.items()}

    def sample(self) -> dict[str, float]:
        """Takes one reading of everything, records peaks and returns it (without calling ``log``)."""
        readings = self._host_readings()
        readings.update(self._gpu_readings())
        with self._peaks_lock:
            for key, value in readings.items():
                if key not in self._peaks or value > self._peaks[key]:
                    self._peaks[key] = value
        return readings

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                readings = self.sample()
            except Exception:
                _logger.exception("system metrics sample failed")
                continue
            step = self._step
            self._step += 1
            for key, value in readings.items():
                try:
                    self._log(key, value, step)
                except Exception:
                    if not self._log_failed:
                        self._log_failed = True
                        _logger.exception("logging a system metric failed; further failures are not reported")

    def _host_readings(self) -> dict[str, float]:
        import psutil

        p = self._prefix
        readings = {
            p + "cpu_percent": float(psutil.cpu_percent(interval=None)),
            p + "process_rss_mb": self._process.memory_info().rss / 1e6,
            p + "memory_used_percent": float(psutil.virtual_memory().percent),
        }
        # Both counters are None on hosts (some containers) that expose no disks or NICs.
        disk = psutil.disk_io_counters()
        if disk is not None and self._baseline_disk is not None:
            readings[p + "disk_read_bytes"] = float(disk.read_bytes - self._baseline_disk.read_bytes)
            readings[p + "disk_write_bytes"] = float(disk.write_bytes - self._baseline_disk.write_bytes)
        net = psutil.net_io_counters()
        if net is not None and self._baseline_net is not None:
            readings[p + "net_sent_bytes"] = float(net.bytes_sent - self._baseline_net.bytes_sent)
            readings[p + "net_recv_bytes"] = float(net.bytes_recv - self._baseline_net.bytes_recv)
        return readings

    def _open_nvml(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            _logger.info("GPU metrics skipped: nvidia-ml-py is not installed (%s)", exc)
            return
        try:
            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as exc:
            # NVMLError_LibraryNotFound on hosts without the driver, DriverNotLoaded, and so on.
            _logger.info("GPU metrics skipped: NVML unavailable (%s)", exc)
            return
        self._nvml = pynvml
        self._gpu_handles = handles

    def _gpu_readings(self) -> dict[str, float]:
        nvml = self._nvml
        if nvml is None:
            return {}
        readings: dict[str, float] = {}
        for index, handle in enumerate(self._gpu_handles):
            base = f"{self._prefix}gpu{index}/"
            self._read(readings, index, base + "utilization_percent",
                       lambda h=handle: float(nvml.nvmlDeviceGetUtilizationRates(h).gpu))
            self._read(readings, index, base + "memory_used_mb",
                       lambda h=handle: nvml.nvmlDeviceGetMemoryInfo(h).used / 1e6)
            self._read(readings, index, base + "temperature_c",
                       lambda h=handle: float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)))
            self._read(readings, index, base + "power_w",
                       lambda h=handle: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0)
        return readings

    def _read(self, readings: dict[str, float], index: int, key: str, read: Callable[[], float]) -> None:
        if (index, key) in self._unsupported:
            return
        try:
            readings[key] = read()
        except Exception as exc:
            self._unsupported.add((index, key))
            _logger.info("GPU reading %s skipped from now on: %s", key, exc)
