"""The vocabulary every layer shares: the deployment spec, dtypes, collectives, the seed's claims,
timelines, number formatting and provenance. Nothing here knows how a run is predicted or
executed; both branches (pyengine.predict, pyengine.execute) import from here, never the reverse.
"""
