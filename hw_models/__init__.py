"""Hardware substrates (analog synapses, spiking networks) that learn with neurosal's rules.

Not implemented yet: see the open issues for the analog and spiking substrates.
"""
