"""The prediction branch: device profiles, the roofline op model, the simulator, the planner, its
verdicts on the seed's claims and the plan search. Torch-free; never imports pyengine.execute."""
