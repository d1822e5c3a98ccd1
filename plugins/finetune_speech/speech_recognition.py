from finetune_speech.common import SpeechTask


class SpeechRecognition(SpeechTask):
    name = "speech-recognition"
