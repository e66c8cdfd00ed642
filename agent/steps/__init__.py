"""The screening steps, one module each: calibrate, map, locate, label, target, visit (move, zoom, confirm),
diffract, record. Each takes the typed `SessionContext` (`agent.steps.context`) and returns a typed
result; they talk to the instrument only through the `drivers.base.Microscope` protocol and report
through the context's output port (records, frames), never to files or the journal directly.
"""
