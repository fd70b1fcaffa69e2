"""Hardware substrates that learn with neurosal's rules.

* :mod:`hw_models.devices`, :mod:`hw_models.array`, :mod:`hw_models.analog`, :mod:`hw_models.presets`:
  limited-conductance analog synapses (differential pairs of resistive devices);
* :mod:`hw_models.sweep`: the device report (accuracy vs levels, nonlinearity, variation);
* :mod:`hw_models.snn`: spiking networks (snnTorch LIF) with local three-factor plasticity;
* :mod:`hw_models.brian`: the same network and plasticity in Brian2, and the cross-check.
"""

from .analog import attach, convert, drift  # noqa: E402

__all__ = ["attach", "convert", "drift"]
