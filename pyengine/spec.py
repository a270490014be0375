"""placeholder"""
class SpecError(ValueError): pass
class DeploymentSpec: pass
def load_spec(p): pass
