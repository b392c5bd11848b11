"""Performance model of K x N grids: profile, link model, partition, step time, recommendation."""

from .cluster import Cluster
from .cost import Config, Prediction, StagePrediction, predict
from .profile import LayerProfile, ModelProfile, load_layer_times, profile_model
from .recommend import Candidate, candidates, recommend

__all__ = ["Cluster", "Config", "Prediction",
           "StagePrediction", "predict", "LayerProfile", "ModelProfile", "load_layer_times",
           "profile_model", "Candidate", "candidates", "recommend"]
