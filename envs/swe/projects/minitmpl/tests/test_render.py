import pytest

from minitmpl import Template, TemplateSyntaxError, render


class User:
    def __init__(self, name):
        self.name = name


def test_variables_and_filters():
    assert render("Hi {{ name }}!", name="ann") == "Hi ann!"
    assert render("{{name|upper}}", name="ann") == "ANN"
    assert render("{{ user.name|title }}", user={"name": "ann lee"}) == "Ann Lee"
    assert render("{{ user.name }}", user=User("bob")) == "bob"
    assert render("{{ items|length }}", items=[1, 2, 3]) == "3"


def test_missing_values_render_empty():
    assert render("[{{ nobody }}][{{ user.nothing }}]", user={}) == "[][]"


def test_escaping_of_tags():
    assert render("{{ x }}", x="<b>") == "&lt;b&gt;"
    assert render("{{ x|safe }}", x="<b>") == "<b>"
    assert Template("{{ x }}", autoescape=False).render(x="<b>") == "<b>"


def test_if_else():
    t = Template("{% if user %}Hi {{ user }}{% else %}Log in{% endif %}")
    assert t.render(user="ann") == "Hi ann"
    assert t.render(user="") == "Log in"
    assert render("{% if not items %}none{% endif %}", items=[]) == "none"


def test_for_loop():
    t = Template("{% for x in xs %}{{ loop.index }}:{{ x }}{% if not loop.last %}, {% endif %}{% endfor %}")
    assert t.render(xs=["a", "b", "c"]) == "1:a, 2:b, 3:c"
    assert t.render(xs=[]) == ""


def test_syntax_errors():
    with pytest.raises(TemplateSyntaxError):
        Template("{% if x %}never closed")
    with pytest.raises(TemplateSyntaxError):
        Template("{% endfor %}")
    with pytest.raises(TemplateSyntaxError):
        Template("{{ x|shout }}")
