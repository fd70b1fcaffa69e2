"""Hardware substrates that learn with neurosal's rules.

* :mod:`hw_models.devices`, :mod:`hw_models.array`, :mod:`hw_models.analog`, :mod:`hw_models.presets`:
  limited-conductance analog synapses (differential pairs of resistive devices);
* :mod:`hw_models.sweep`: the device report (accuracy vs levels, nonlinearity, variation).

Spiking networks are planned (see the open issue).
"""
