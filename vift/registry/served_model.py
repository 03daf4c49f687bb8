"""The registered model's code, logged as MLflow "models from code": loading the model runs this
file and unpickles nothing. Settings arrive as the model's ``model_config``; weights as artifacts.
"""

from mlflow.models import set_model

from vift.registry.pyfunc import ViftModel

set_model(ViftModel())
