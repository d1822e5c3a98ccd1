"""Built-in NLP task family for finetune (registered through the ``finetune`` entry point)."""

from finetune import hookimpl

finetune_hook_version = "1"


@hookimpl
def finetune_register_tasks(register):
    from finetune_nlp.multi_label import MultiLabelClassification
    from finetune_nlp.question_answering import QuestionAnswering
    from finetune_nlp.text_classification import TextClassification
    from finetune_nlp.text_regression import TextRegression
    from finetune_nlp.token_classification import TokenClassification

    register(TextClassification)
    register(TokenClassification)
    register(MultiLabelClassification)
    register(TextRegression)
    register(QuestionAnswering)


@hookimpl
def finetune_claim_data(probe):
    from finetune_nlp.claims import claim_data

    return claim_data(probe)
